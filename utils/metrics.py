"""Confusion-matrix segmentation metrics (spec second-stage §6)."""
from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, cols = prediction.

    Stays on the tensors' device and never waits for it: ignored pixels count in one extra
    bin that is dropped, a fixed-size scatter-add (boolean indexing and bincount both read a
    size back from the device; this is also faster on the CPU).
    """
    n2 = num_classes * num_classes
    idx = torch.where(target != ignore_index, target.long() * num_classes + pred.long(), n2).flatten()
    counts = torch.zeros(n2 + 1, dtype=torch.long, device=idx.device)
    return counts.scatter_add_(0, idx, torch.ones_like(idx))[:n2].reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray | torch.Tensor) -> dict:
    """Pixel accuracy, mean class accuracy, mean precision and mIoU.

    Means run over the classes present in the ground truth (non-empty rows), as
    the reference does; absent classes would otherwise add 0/0 terms.
    """
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    pred = conf.sum(0)
    present = gt > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)
        recall = tp / gt
        precision = np.where(pred > 0, tp / pred, 0.0)
    total = conf.sum()
    return {
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mean_acc": float(recall[present].mean()) if present.any() else 0.0,
        "mean_precision": float(precision[present].mean()) if present.any() else 0.0,
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "iou": [float(v) if p else None for v, p in zip(iou, present)],
    }


def iou_table(names: list[str], iou: list[float | None]) -> str:
    """Per-class IoU lines for the classes present in the ground truth, then the absent ones
    by name on one line (COCO lists 81 classes; a small val set shows a few of them)."""
    width = max(len(n) for n in names)
    lines = [f"  {n:<{width}}  {v:.4f}" for n, v in zip(names, iou) if v is not None]
    absent = [n for n, v in zip(names, iou) if v is None]
    if absent:
        lines.append(f"  absent from the ground truth ({len(absent)}): {', '.join(absent)}")
    return "\n".join(lines)

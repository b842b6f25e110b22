"""Confusion-matrix segmentation metrics of both stages.

One confusion matrix (``confusion_matrix``; rows = ground truth, cols = prediction, the void
value left out) and two mIoU rules, each named by the classes its mean runs over:

* ``segmentation_scores``: the classes present in the ground truth (the second stage's, as the
  reference's evaluation; spec second-stage §6);
* ``seen_class_scores``: the classes present in the ground truth or the prediction (chainercv's
  ``eval_semantic_segmentation``, the first stage's eval_cam / eval_sem_seg; spec §8).

``StreamingConfusion`` accumulates a matrix image by image (QUIRK-18: no list of maps in memory).
"""
from __future__ import annotations

from typing import Any

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


def confusion_of_maps(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore: int) -> np.ndarray:
    """``confusion_matrix`` of two label maps as numpy (n, n) int64 counts ``conf[gt, pred]``
    over the pixels whose gt is not ``ignore``; maps of different sizes are refused."""
    if gt.shape != pred.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    return confusion_matrix(torch.from_numpy(np.ascontiguousarray(pred)).long(),
                            torch.from_numpy(np.ascontiguousarray(gt)).long(), n_classes,
                            ignore_index=ignore).numpy()


class StreamingConfusion:
    """A confusion matrix accumulated image by image (QUIRK-18: no list of maps in memory).

    ``add(gt, pred)`` counts ``conf[gt, pred]`` over pixels whose gt is not ``ignore`` (the first
    stage's readers map the void value to -1); the class count is the data set's label count
    (VOC 21, COCO 81). ``scores`` is the first stage's rule, ``seen_class_scores``.
    """

    def __init__(self, n_classes: int, ignore: int = -1):
        self.n_classes = int(n_classes)
        self.ignore = ignore
        self.matrix = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        self.images = 0

    def add(self, gt: np.ndarray, pred: np.ndarray) -> "StreamingConfusion":
        self.matrix += confusion_of_maps(gt, pred, self.n_classes, self.ignore)
        self.images += 1
        return self

    def scores(self) -> dict[str, Any]:
        return seen_class_scores(self.matrix)


def seen_class_scores(conf: np.ndarray) -> dict[str, Any]:
    """chainercv's rule (§8): IoU_c = tp/(row + col − tp); mIoU = nan-mean over all classes
    (background included), so classes absent from both GT and prediction do not count."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    valid = ~np.isnan(iou)
    return {"miou": float(np.nanmean(iou)) if valid.any() else float("nan"),
            "iou": [None if np.isnan(v) else float(v) for v in iou]}


def fg_on_gt_background(conf: np.ndarray) -> float | None:
    """Share of the predicted-foreground pixels whose GT is background (§16.2 eval_cam):
    ``Σ_{c>0} conf[0, c] / Σ_{c>0} Σ_i conf[i, c]``; None without foreground predictions."""
    conf = np.asarray(conf, dtype=np.float64)
    fg = conf[:, 1:].sum()
    return float(conf[0, 1:].sum() / fg) if fg > 0 else None


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

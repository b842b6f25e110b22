"""Step eval_sem_seg (spec §13): mIoU of the random-walk pseudo-labels on ``chainer_eval_set``.

Ground truth ``SegmentationClass/<id>.png`` (255 ignored), prediction ``<sem_seg_out_dir>/<id>.png``
(a 255 would count as background; the pipeline writes none). The confusion matrix is
accumulated image by image. Besides IoU/mIoU (nan-mean over the 21 classes, background
included, classes absent from both GT and prediction not counted) it reports for background
and, averaged over the foreground classes present, ``fp = FP/union`` and ``fn = FN/union``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misc.runtime import confusion, eval_ids, get_logger, iou_scores, progress
from step.make_sem_seg_labels import sem_seg_dir
from voc12.dataloader import IGNORE, VOC12GTDataset, read_label_png

NUM_LABELS = 21  # background + the 20 VOC classes


def fp_fn_rates(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class ``fp_c = 1 − |GT_c|/U_c`` and ``fn_c = 1 − |P_c|/U_c`` (NaN where U_c = 0)."""
    conf = np.asarray(conf, dtype=np.float64)
    gt, pred, tp = conf.sum(1), conf.sum(0), np.diag(conf)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - gt / union, 1.0 - pred / union


def _nanmean(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def read_prediction(path: Path, name: str) -> np.ndarray:
    pred = read_label_png(path, name, "pseudo-label").astype(np.int64)
    pred[pred == IGNORE] = 0
    if pred.max(initial=0) >= NUM_LABELS:
        raise ValueError(f"pseudo-label for id '{name}' has class id {pred.max()} >= {NUM_LABELS}: {path}")
    return pred


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    ids = eval_ids(args)
    gt_set = VOC12GTDataset(ids, args.voc12_root)
    pred_dir = sem_seg_dir(args)
    conf = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for idx in progress(range(len(ids)), "eval_sem_seg", enabled=not getattr(args, "no_progress", False)):
        name = ids[idx]
        gt = gt_set[idx]
        path = pred_dir / f"{name}.png"
        pred = read_prediction(path, name)
        if pred.shape != gt.shape:
            raise ValueError(f"id '{name}': pseudo-label {path} is {pred.shape}, ground truth is {gt.shape}")
        conf += confusion(gt, pred, NUM_LABELS)
    scores = iou_scores(conf)
    fp, fn = fp_fn_rates(conf)
    out = {"sem_seg_miou": scores["miou"], "sem_seg_iou": scores["iou"], "images": len(ids),
           "fp_bg": None if np.isnan(fp[0]) else float(fp[0]), "fn_bg": None if np.isnan(fn[0]) else float(fn[0]),
           "fp_fg": _nanmean(fp[1:]), "fn_fg": _nanmean(fn[1:])}
    log.info(f"eval_sem_seg: {len(ids)} images, mIoU {100 * scores['miou']:.2f}")
    log.info("eval_sem_seg: IoU per class " + " ".join("-" if v is None else f"{100 * v:.1f}" for v in scores["iou"]))
    log.info("eval_sem_seg: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()
                                          if k.startswith(("fp", "fn")) and v is not None))
    return out


__all__ = ["run", "fp_fn_rates", "read_prediction", "NUM_LABELS"]

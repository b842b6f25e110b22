"""Step eval_sem_seg (spec §13): mIoU of the random-walk pseudo-labels on ``chainer_eval_set``.

Ground truth VOC ``SegmentationClass/<id>.png`` (255 ignored) / COCO ``mask/train2014/<int id>.png``
(no void), prediction ``<sem_seg_out_dir>/<id>.png`` (a 255 would count as background; the
pipeline writes none). The confusion matrix (the data set's label count: VOC 21, COCO 81) is
accumulated image by image (QUIRK-18). Besides IoU/mIoU (nan-mean over all classes, background
included, classes absent from both GT and prediction not counted) it reports for background
and, averaged over the foreground classes present, ``fp = FP/union`` and ``fn = FN/union``.
When summary.json holds an eval_cam entry for the same images, the pseudo-labels are also
compared with the CAMs, at ``cam_eval_thres`` and at the best threshold of its sweep.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from datasets.sources import SEED_IGNORE as IGNORE, DataSource
from datasets.views import GroundTruthView, data_source
from irn.misc.runtime import eval_ids, get_logger, progress
from irn.step.make_sem_seg_labels import sem_seg_dir
from utils.errors import DataError
from utils.metrics import StreamingConfusion, fg_on_gt_background


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


def read_prediction(path: Path, name: str, source: DataSource) -> np.ndarray:
    """A pseudo-label PNG as int64, 255 → 0; values must be below the source's label count
    (the reader names the id and file otherwise)."""
    pred = source.read_label_map(path, name, "pseudo-label").astype(np.int64)
    pred[pred == IGNORE] = 0
    return pred


def compare_with_cams(sem_seg_miou: float, images: int, eval_cam: dict[str, Any] | None) -> dict[str, Any]:
    """Gains of the pseudo-labels over the CAMs of an eval_cam entry on as many images.

    The random walk exists to beat the CAMs; where it does not beat them at their best swept
    threshold, the labels add nothing a threshold would not (on the demo data this meant an
    undertrained IRN). Returns {} when there is nothing comparable.
    """
    if not eval_cam or eval_cam.get("images") != images or eval_cam.get("cam_miou") is None:
        return {}
    out = {"gain_over_cam": sem_seg_miou - eval_cam["cam_miou"]}
    sweep = eval_cam.get("cam_miou_sweep") or {}
    if sweep:
        best = max(sweep, key=sweep.get)
        out.update(best_cam_thres=float(best), gain_over_best_cam=sem_seg_miou - sweep[best])
    return out


def _recorded_eval_cam(args: Any) -> dict[str, Any] | None:
    path = args.summary_path
    if not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text()).get("steps", {}).get("eval_cam", {}).get("metrics")
    except (json.JSONDecodeError, AttributeError):
        return None  # a damaged summary only costs the comparison; run_sample rewrites it


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    source = data_source(args)
    ids = eval_ids(args)
    gt_set = GroundTruthView(ids, source)
    pred_dir = sem_seg_dir(args)
    stream = StreamingConfusion(source.num_labels)
    for idx in progress(range(len(ids)), "eval_sem_seg", enabled=not args.no_progress):
        name = ids[idx]
        gt = gt_set[idx]
        path = pred_dir / f"{name}.png"
        pred = read_prediction(path, name, source)
        if pred.shape != gt.shape:
            raise DataError(f"id '{name}': pseudo-label {path} is {pred.shape}, ground truth is {gt.shape}")
        stream.add(gt, pred)
    conf = stream.matrix
    scores = stream.scores()
    fp, fn = fp_fn_rates(conf)
    out = {"sem_seg_miou": scores["miou"], "sem_seg_iou": scores["iou"], "images": len(ids),
           "fp_bg": None if np.isnan(fp[0]) else float(fp[0]), "fn_bg": None if np.isnan(fn[0]) else float(fn[0]),
           "fp_fg": _nanmean(fp[1:]), "fn_fg": _nanmean(fn[1:])}
    if source.name == "coco":
        out["fg_on_gt_background"] = fg_on_gt_background(conf)
    log.info(f"eval_sem_seg: {len(ids)} images, mIoU {100 * scores['miou']:.2f}")
    log.info("eval_sem_seg: IoU per class " + " ".join("-" if v is None else f"{100 * v:.1f}" for v in scores["iou"]))
    log.info("eval_sem_seg: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()
                                          if k.startswith(("fp", "fn")) and v is not None))
    eval_cam = _recorded_eval_cam(args)
    gains = compare_with_cams(scores["miou"], len(ids), eval_cam)
    out.update(gains)
    if gains:
        msg = f"eval_sem_seg: pseudo-labels {100 * gains['gain_over_cam']:+.1f} points over the CAMs at " \
              f"threshold {eval_cam.get('cam_eval_thres')}"
        if "gain_over_best_cam" in gains:
            msg += f", {100 * gains['gain_over_best_cam']:+.1f} over the sweep's best threshold {gains['best_cam_thres']:g}"
        log.info(msg)
        if gains.get("gain_over_best_cam", gains["gain_over_cam"]) <= 0:
            log.warning("eval_sem_seg: the random walk does not beat thresholded CAMs; an IRN trained for too "
                        "few updates learns objectness instead of boundaries (docs/first-stage.md, 'What it took: enough IRN updates')")
    return out


__all__ = ["run", "compare_with_cams", "fp_fn_rates", "read_prediction"]

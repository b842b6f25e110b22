"""Step eval_cam (spec §8, COCO §16.2): mIoU of thresholded high-res CAMs on ``chainer_eval_set``.

The confusion matrix (the data set's label count: VOC 21, COCO 81) is accumulated image by
image (QUIRK-18: no list of maps in memory). GT: VOC ``SegmentationClass`` (255 ignored), COCO
``mask/train2014/<int id>.png`` (no void). For COCO it also reports the share of the
predicted-foreground pixels that are GT background (``fg_on_gt_background``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datasets.views import GroundTruthView, data_source
from irn.misc.cam_io import CamFileError, load_cam
from irn.misc.runtime import eval_ids, get_logger, progress
from utils.metrics import StreamingConfusion, fg_on_gt_background, seen_class_scores


def cam_prediction(high_res: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Background plane of value ``threshold`` first, argmax (ties → lowest channel, so a pixel
    whose best CAM equals the threshold is background), mapped through [0, k_1+1, …]."""
    planes = np.concatenate([np.full((1,) + high_res.shape[1:], threshold, dtype=high_res.dtype), high_res], 0)
    label_of = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    return label_of[np.argmax(planes, axis=0)]


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    source = data_source(args)
    ids = eval_ids(args)
    gt_set = GroundTruthView(ids, source)
    cam_dir = Path(args.cam_out_dir)
    conf = StreamingConfusion(source.num_labels)
    sweep = [float(t) for t in args.cam_eval_sweep]
    sweep_conf = [StreamingConfusion(source.num_labels) for _ in sweep]
    for idx in progress(range(len(ids)), "eval_cam", enabled=not args.no_progress):
        name = ids[idx]
        gt = gt_set[idx]
        cam = load_cam(cam_dir / f"{name}.npy", name)
        if "high_res" not in cam:
            raise CamFileError(f"CAM file for id '{name}' has no 'high_res': {cam_dir / (name + '.npy')}")
        if cam["high_res"].shape[1:] != gt.shape:
            raise CamFileError(f"id '{name}': high_res CAM {cam['high_res'].shape[1:]} differs from the "
                             f"ground truth {gt.shape}")
        conf.add(gt, cam_prediction(cam["high_res"], cam["keys"], args.cam_eval_thres))
        for t, c in zip(sweep, sweep_conf):
            c.add(gt, cam_prediction(cam["high_res"], cam["keys"], t))
    scores = conf.scores()
    log.info(f"eval_cam: threshold {args.cam_eval_thres}, {len(ids)} images, mIoU {100 * scores['miou']:.2f}")
    log.info("eval_cam: IoU per class " + " ".join("-" if v is None else f"{100 * v:.1f}" for v in scores["iou"]))
    out = {"cam_miou": scores["miou"], "cam_iou": scores["iou"], "cam_eval_thres": args.cam_eval_thres,
           "images": len(ids)}
    if source.name == "coco":
        share = fg_on_gt_background(conf.matrix)
        out["fg_on_gt_background"] = share
        log.info("eval_cam: predicted-foreground pixels that are GT background: "
                 + ("-" if share is None else f"{100 * share:.2f} %"))
    if sweep:
        out["cam_miou_sweep"] = {f"{t:g}": seen_class_scores(c.matrix)["miou"] for t, c in zip(sweep, sweep_conf)}
        log.info("eval_cam: threshold sweep " + " ".join(f"{k}:{100 * v:.1f}" for k, v in out["cam_miou_sweep"].items()))
    return out

"""Step eval_cam (spec §8): mIoU of thresholded high-res CAMs on ``chainer_eval_set``.

The confusion matrix is accumulated image by image (no list of maps in memory).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misc.cam_io import load_cam
from misc.runtime import confusion, eval_ids, get_logger, iou_scores, progress
from voc12.dataloader import VOC12GTDataset

NUM_LABELS = 21  # background + the 20 VOC classes


def cam_prediction(high_res: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Background plane of value ``threshold`` first, argmax (ties → lowest channel, so a pixel
    whose best CAM equals the threshold is background), mapped through [0, k_1+1, …]."""
    planes = np.concatenate([np.full((1,) + high_res.shape[1:], threshold, dtype=high_res.dtype), high_res], 0)
    label_of = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    return label_of[np.argmax(planes, axis=0)]


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    ids = eval_ids(args)
    gt_set = VOC12GTDataset(ids, args.voc12_root)
    cam_dir = Path(args.cam_out_dir)
    conf = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    sweep = [float(t) for t in (getattr(args, "cam_eval_sweep", None) or ())]
    sweep_conf = np.zeros((len(sweep), NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for idx in progress(range(len(ids)), "eval_cam", enabled=not args.no_progress):
        name = ids[idx]
        gt = gt_set[idx]
        cam = load_cam(cam_dir / f"{name}.npy", name)
        if "high_res" not in cam:
            raise ValueError(f"CAM file for id '{name}' has no 'high_res': {cam_dir / (name + '.npy')}")
        if cam["high_res"].shape[1:] != gt.shape:
            raise ValueError(f"id '{name}': high_res CAM {cam['high_res'].shape[1:]} differs from the "
                             f"ground truth {gt.shape}")
        pred = cam_prediction(cam["high_res"], cam["keys"], args.cam_eval_thres)
        conf += confusion(gt, pred, NUM_LABELS)
        for j, t in enumerate(sweep):
            sweep_conf[j] += confusion(gt, cam_prediction(cam["high_res"], cam["keys"], t), NUM_LABELS)
    scores = iou_scores(conf)
    log.info(f"eval_cam: threshold {args.cam_eval_thres}, {len(ids)} images, mIoU {100 * scores['miou']:.2f}")
    log.info("eval_cam: IoU per class " + " ".join("-" if v is None else f"{100 * v:.1f}" for v in scores["iou"]))
    out = {"cam_miou": scores["miou"], "cam_iou": scores["iou"], "cam_eval_thres": args.cam_eval_thres,
           "images": len(ids)}
    if sweep:
        out["cam_miou_sweep"] = {f"{t:g}": iou_scores(c)["miou"] for t, c in zip(sweep, sweep_conf)}
        log.info("eval_cam: threshold sweep " + " ".join(f"{k}:{100 * v:.1f}" for k, v in out["cam_miou_sweep"].items()))
    return out

"""Step cam_to_ir_label (spec §9): confident foreground/background seeds refined by a dense CRF.

Per image two CRF passes on the hard argmax of the high-res CAMs with a constant background
plane — high threshold (``conf_fg_thres``) for confident foreground, low threshold
(``conf_bg_thres``) for confident background — combined into 0 / class / 255 (ignore) and
saved as ``<ir_label_out_dir>/<id>.png``. An image without any class (COCO) gets an all-zero
label (all confident background, no CRF). The CRF runs in ``num_workers`` processes; ids
already written are skipped unless ``--overwrite``. Thresholds: ``conf_fg_thres`` /
``conf_bg_thres`` (voc.yaml 0.30 / 0.05, coco.yaml 0.35 / 0.10); the CRF is the second stage's
(utils/crf.py ``hard_label_crf``) with the ``crf_*`` settings.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np

from datasets.sources import SEED_IGNORE
from datasets.views import data_source
from irn.misc.cam_io import CamFileError, load_cam
from irn.misc.runtime import eval_ids, get_logger, pending, progress, read_ids
from utils.crf import HardLabelCrf, hard_label_crf
from utils.io import save_png

IGNORE = SEED_IGNORE


def combine(fg_conf: np.ndarray, bg_conf: np.ndarray) -> np.ndarray:
    """(c>0, ·) → c; (0, 0) → 0; (0, >0) → 255 (§9 table)."""
    out = fg_conf.astype(np.uint8).copy()
    out[(fg_conf == 0) & (bg_conf > 0)] = IGNORE
    return out


def seed_pass(img: np.ndarray, high_res: np.ndarray, keys: np.ndarray, threshold: float,
              crf: HardLabelCrf) -> np.ndarray:
    """Constant plane ``threshold`` first, argmax, CRF over K+1 labels, mapped to class ids."""
    planes = np.concatenate([np.full((1,) + high_res.shape[1:], threshold, dtype=np.float32), high_res], 0)
    hard = np.argmax(planes, axis=0)
    label_of = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    return label_of[hard_label_crf(img, hard, label_of.size, crf)]


def ir_label_for(img: np.ndarray, cam: dict[str, np.ndarray], fg_thres: float, bg_thres: float,
                 crf: HardLabelCrf, item_id: str = "?") -> np.ndarray:
    high_res, keys = cam["high_res"], cam["keys"]
    if high_res.shape[1:] != img.shape[:2]:
        raise CamFileError(f"id '{item_id}': high_res CAM {high_res.shape[1:]} differs from the image "
                           f"{img.shape[:2]} (CAMs of other images? rerun make_cam with --overwrite)")
    if keys.size == 0:
        # No class: everything is confident background (the reference's COCO rule; a CRF needs ≥ 2 labels).
        return np.zeros(img.shape[:2], dtype=np.uint8)
    fg = seed_pass(img, high_res, keys, fg_thres, crf)
    bg = seed_pass(img, high_res, keys, bg_thres, crf)
    return combine(fg, bg)


# Worker-process state, set by the pool initializer (one copy per process, not per task).
_JOB: dict[str, Any] = {}


def _init_worker(job: dict[str, Any]) -> None:
    _JOB.clear()
    _JOB.update(job)


def _process(item_id: str) -> str:
    cam = load_cam(Path(_JOB["cam_dir"]) / f"{item_id}.npy", item_id)
    img = _JOB["source"].read_image(item_id)
    label = ir_label_for(img, cam, _JOB["fg"], _JOB["bg"], _JOB["crf"], item_id)
    save_png(Path(_JOB["out_dir"]) / f"{item_id}.png", label)
    return item_id


def crf_params(args: Any) -> HardLabelCrf:
    """The seed CRF of the crf_* settings."""
    return HardLabelCrf(iterations=args.crf_iters, gaussian_sxy=args.crf_gauss_sxy,
                        gaussian_compat=args.crf_gauss_compat, bilateral_sxy=args.crf_bi_sxy,
                        bilateral_srgb=args.crf_bi_srgb, bilateral_compat=args.crf_bi_compat,
                        gt_prob=args.crf_gt_prob)


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    ids = read_ids(args, "train_list")
    out_dir = Path(args.ir_label_out_dir)
    todo = pending(ids, [(out_dir, ".png")], args.overwrite)
    source = data_source(args)
    job = {"cam_dir": str(args.cam_out_dir), "source": source, "out_dir": str(out_dir),
           "fg": float(args.conf_fg_thres), "bg": float(args.conf_bg_thres), "crf": crf_params(args)}
    workers = max(1, min(int(args.num_workers), len(todo)))
    log.info(f"cam_to_ir_label: {len(ids)} ids, {len(ids) - len(todo)} already done, "
             f"fg {args.conf_fg_thres} / bg {args.conf_bg_thres}, {workers} CRF process(es)")
    show = not args.no_progress
    if workers == 1:
        _init_worker(job)
        for _ in progress(map(_process, todo), "cam_to_ir_label", total=len(todo), enabled=show):
            pass
    elif todo:
        # spawn, not fork: the driver process has already run torch's thread pools.
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
            done = pool.imap_unordered(_process, todo, chunksize=max(1, min(8, len(todo) // (4 * workers))))
            for _ in progress(done, "cam_to_ir_label", total=len(todo), enabled=show):
                pass
    out = {"images": len(ids), "written": len(todo)}
    out.update(seed_quality(args, out_dir, source))
    log.info(f"cam_to_ir_label: seeds cover {100 * out['seed_coverage']:.1f}% of the pixels of "
             f"{out['seed_eval_images']} eval images, {100 * out['seed_precision']:.1f}% of them correct"
             if out.get("seed_eval_images") else "cam_to_ir_label: no ground truth to score the seeds")
    return out


def seed_quality(args: Any, label_dir: Path, source: Any = None) -> dict[str, Any]:
    """Share of non-ignored seed pixels and their accuracy against the GT (void excluded), over the
    eval-split ids that have both a seed label and a GT file — a diagnostic only, counted image
    by image."""
    source = source or data_source(args)
    try:
        ids = eval_ids(args)
    except Exception:  # noqa: BLE001 - no eval list: nothing to report
        return {}
    n = seeded = correct = images = 0
    for i in ids:
        seed_path = label_dir / f"{i}.png"
        try:
            gt_path = source.gt_path(i)
        except (ValueError, OSError):
            continue
        if not (seed_path.is_file() and gt_path.is_file()):
            continue
        seed, gt = source.read_label_map(seed_path, i, "ir_label"), source.read_gt(i)
        if seed.shape != gt.shape:
            continue
        valid = gt >= 0  # read_gt maps the void value to -1
        keep = valid & (seed != IGNORE)
        n += int(valid.sum())
        seeded += int(keep.sum())
        correct += int((keep & (seed == gt)).sum())
        images += 1
    if not images:
        return {}
    return {"seed_eval_images": images, "seed_coverage": seeded / max(n, 1),
            "seed_precision": correct / max(seeded, 1)}

"""Full-resolution predictions from the maps ``main.py --test`` saved: optional dense CRF, mIoU,
VOC evaluation-server layout, pictures (spec second-stage §7).

    python test.py --logits_dir data/logging/beco1/logits --mode val [--crf]
    python test.py --logits_dir data/logging/beco1/logits --mode test --crf     # + VOC submission tar

For every id of the split: read the original image (and, in val mode, its ground
truth), upsample the saved map bilinearly to the image size, softmax, optional dense
CRF, argmax -> ``<run>/<mode>_pred[_crf]/<id>.png`` (VOC palette). Val mode prints
per-class IoU and mIoU at the original resolution and writes them to
``<run>/<mode>_pred[_crf]_scores.json``. Work runs in ``--n-jobs`` single-threaded
worker processes. A rerun skips ids whose prediction exists (``--overwrite`` redoes them).
"""
from __future__ import annotations

import os

# One compute thread per process, set before numpy/torch load their thread pools; the
# forked workers inherit it. n workers then keep n cores busy, never n x cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datasets.build import dataset_entry  # noqa: E402
from datasets.readers import DataError, SplitFiles, read_image, read_label  # noqa: E402
from utils.config import Config, ConfigError, CrfCfg, apply_overrides, load_yaml  # noqa: E402
from utils.crf import available_cores, parallel_map, postprocess  # noqa: E402
from utils.errors import exit_status  # noqa: E402
from utils import provenance  # noqa: E402
from utils.io import atomic_write, save_json, save_png  # noqa: E402
from utils.score_maps import SUFFIX, ScoreMapError, load_score_map  # noqa: E402
from utils.voc import IGNORE_INDEX, colorize, voc_palette  # noqa: E402

# Picture layout, in pixels (drawing only, no effect on any result).
VIS_PAD = 4
VIS_TITLE_H = 18
VIS_SWATCH = 12
VIS_LEGEND_ROW_H = 18
VIS_FONT_SCALE = 0.4

# Flags that set test.crf.<key>; None leaves the config's value.
CRF_FLAGS = {"crf_iterations": "iterations", "crf_gaussian_sxy": "gaussian_sxy",
             "crf_gaussian_compat": "gaussian_compat", "crf_bilateral_sxy": "bilateral_sxy",
             "crf_bilateral_srgb": "bilateral_srgb", "crf_bilateral_compat": "bilateral_compat",
             "crf_prob_clip": "prob_clip", "crf_prune_labels": "prune_labels",
             "crf_prune_threshold": "prune_threshold"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logits_dir", required=True, help="folder of <id>.npy maps written by main.py --test")
    p.add_argument("--mode", choices=("val", "test"), default="val",
                   help="val: score against the ground truth; test: no labels, also write the VOC "
                        "server layout and its tar (default: %(default)s)")
    p.add_argument("--crf", action="store_true", help="dense CRF before the argmax")
    p.add_argument("--config", default=None,
                   help="config of the run (default: config.yaml beside the logits folder)")
    p.add_argument("--split", default=None, help="split list to read (default: the config's test.split)")
    p.add_argument("--n-jobs", type=int, default=None, help="worker processes (default: all available cores)")
    p.add_argument("--crf-legacy-image", action="store_true",
                   help="give the CRF the reference's corrupted mean-subtracted uint8 image (spec §7 QUIRK)")
    p.add_argument("--crf-iterations", type=int, help="mean-field iterations (test.crf.iterations)")
    p.add_argument("--crf-gaussian-sxy", type=float, help="test.crf.gaussian_sxy")
    p.add_argument("--crf-gaussian-compat", type=float, help="test.crf.gaussian_compat")
    p.add_argument("--crf-bilateral-sxy", type=float, help="test.crf.bilateral_sxy")
    p.add_argument("--crf-bilateral-srgb", type=float, help="test.crf.bilateral_srgb")
    p.add_argument("--crf-bilateral-compat", type=float, help="test.crf.bilateral_compat")
    p.add_argument("--crf-prob-clip", type=float, help="probability floor of the unary (test.crf.prob_clip)")
    p.add_argument("--crf-prune-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="run the CRF over the labels reaching --crf-prune-threshold somewhere "
                        "(test.crf.prune_labels)")
    p.add_argument("--crf-prune-threshold", type=float, help="test.crf.prune_threshold")
    p.add_argument("--vis", type=int, default=0, metavar="N",
                   help="write N pictures (image | prediction | CRF prediction | ground truth) "
                        "to <run>/<mode>_vis/")
    p.add_argument("--overwrite", action="store_true", help="redo ids whose prediction already exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data")
    return p.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace, run_dir: Path) -> Config:
    # Here, not at the top: the config's tables (segmenters, methods) import torch, which
    # --help and a refused argument do without.
    from engine.config import build_config
    path = Path(args.config) if args.config else run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no config at {path}: main.py --test saves one beside the logits folder; "
                          f"pass --config")
    raw = load_yaml(path)
    crf = raw.setdefault("test", {}).setdefault("crf", {})
    for flag, key in CRF_FLAGS.items():
        if getattr(args, flag) is not None:
            crf[key] = getattr(args, flag)
    if args.crf_legacy_image:
        crf["legacy_image"] = True
    cfg = build_config(apply_overrides(raw, args.overrides))
    c = cfg.test.crf
    for key, ok in (("iterations", c.iterations >= 0), ("prob_clip", 0 < c.prob_clip < 1),
                    ("prune_threshold", 0 <= c.prune_threshold <= 1), ("gaussian_sxy", c.gaussian_sxy > 0),
                    ("bilateral_sxy", c.bilateral_sxy > 0), ("bilateral_srgb", c.bilateral_srgb > 0),
                    ("legacy_mean", len(c.legacy_mean) == 3)):
        if not ok:
            raise ConfigError(f"config key 'test.crf.{key}': invalid value {getattr(c, key)!r}")
    if cfg.test.chunk_size < 1:
        raise ConfigError("config key 'test.chunk_size': must be >= 1")
    return cfg


# ----------------------------------------------------------------------------- one id (worker side)

@dataclass(frozen=True)
class Job:
    """Everything a worker needs, sent once per worker process."""
    files: SplitFiles  # images, and ground truth unless with_gt is false (test mode)
    with_gt: bool
    gt_ignore_index: int | None
    truncated_ok: bool
    logits_dir: Path
    logits_suffix: str  # .npy (dense maps) | .npz (compact)
    pred_dir: Path
    vis_dir: Path
    num_classes: int
    names: tuple[str, ...]
    crf: CrfCfg | None  # None without --crf
    crf_for_vis: CrfCfg  # pictures always show the CRF column
    align_corners: bool
    overwrite: bool


_JOB: Job | None = None


def _set_job(job: Job) -> None:
    global _JOB
    _JOB = job


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, cols = prediction; 255 ignored."""
    valid = gt != IGNORE_INDEX
    idx = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def process_id(job: Job, item_id: str, vis: bool) -> tuple[str, np.ndarray | None, str]:
    """Predict (or reuse) one id's label map; returns (id, confusion or None, "done" | "kept")."""
    pred_path = job.pred_dir / f"{item_id}.png"
    gt = None
    if job.with_gt:
        gt = np.asarray(read_label(job.files.gt(item_id), item_id, job.num_classes, "ground truth",
                                   job.gt_ignore_index))
    if pred_path.is_file() and not job.overwrite and not vis:
        pred = np.asarray(Image.open(pred_path))
        if gt is not None and pred.shape != gt.shape:
            raise DataError(f"existing prediction for id '{item_id}' is {pred.shape[1]}x{pred.shape[0]} but its "
                            f"ground truth is {gt.shape[1]}x{gt.shape[0]}: {pred_path}; rerun with --overwrite")
        return item_id, None if gt is None else confusion(gt, pred, job.num_classes), "kept"

    try:
        logits = load_score_map(job.logits_dir / f"{item_id}{job.logits_suffix}", item_id, job.num_classes)
    except ScoreMapError as e:
        raise DataError(str(e)) from None
    image_path = job.files.image(item_id)
    image = np.asarray(read_image(image_path, item_id, job.truncated_ok))
    if gt is not None and gt.shape != image.shape[:2]:
        raise DataError(f"id '{item_id}': ground truth is {gt.shape[1]}x{gt.shape[0]} but {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]} (width x height)")
    pred, pred_crf = postprocess(logits, image, job.crf_for_vis if vis else job.crf, job.align_corners)
    final = pred_crf if job.crf is not None else pred
    status = "kept"
    if job.crf is not None and logits.dropped_peak >= job.crf.prune_threshold:
        status = "done_capped"  # the compact map lacks a class the full CRF would have run over
    if job.overwrite or not pred_path.is_file():
        save_png(pred_path, final, voc_palette())
        status = "done_capped" if status == "done_capped" else "done"
    if vis:
        save_png(job.vis_dir / f"{item_id}.png", render_vis(image, pred, pred_crf, gt, job.names))
    return item_id, None if gt is None else confusion(gt, final, job.num_classes), status


def _work(task: tuple[str, bool]) -> tuple[str, np.ndarray | None, str, str | None]:
    """Worker entry: errors come back as messages naming the id, so the parent stops cleanly."""
    item_id, vis = task
    try:
        out = process_id(_JOB, item_id, vis)
    except (DataError, ValueError, OSError) as e:
        message = str(e) if item_id in str(e) else f"id '{item_id}': {e}"
        return item_id, None, "error", message
    return (*out, None)


# ----------------------------------------------------------------------------- pictures

def _put_text(canvas: np.ndarray, text: str, x: int, y: int) -> None:
    import cv2
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, VIS_FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)


def _text_width(text: str) -> int:
    import cv2
    return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, VIS_FONT_SCALE, 1)[0][0]


def render_vis(image: np.ndarray, pred: np.ndarray, pred_crf: np.ndarray | None, gt: np.ndarray | None,
               names: tuple[str, ...] | list[str]) -> np.ndarray:
    """image | prediction | CRF prediction | ground truth side by side, titled, with a colour
    legend of the classes shown (VOC palette; void = 255 in cream). HxWx3 uint8."""
    palette = voc_palette()
    panels = [("image", image), ("prediction", colorize(pred))]
    if pred_crf is not None:
        panels.append(("CRF", colorize(pred_crf)))
    if gt is not None:
        panels.append(("ground truth", colorize(gt)))
    h, w = image.shape[:2]
    labels = sorted(set(np.unique(pred).tolist())
                    | (set(np.unique(pred_crf).tolist()) if pred_crf is not None else set())
                    | (set(np.unique(gt).tolist()) if gt is not None else set()))
    entries = [(k, names[k] if k < len(names) else ("void" if k == IGNORE_INDEX else str(k))) for k in labels]
    width = len(panels) * (w + VIS_PAD) + VIS_PAD
    # Lay the legend out in rows that fit the picture's width.
    rows, row, x = [], [], VIS_PAD
    for k, name in entries:
        item_w = VIS_SWATCH + 4 + _text_width(name) + 2 * VIS_PAD
        if row and x + item_w > width:
            rows.append(row)
            row, x = [], VIS_PAD
        row.append((k, name, x))
        x += item_w
    if row:
        rows.append(row)
    height = VIS_TITLE_H + h + VIS_PAD + len(rows) * VIS_LEGEND_ROW_H + VIS_PAD
    canvas = np.full((height, width, 3), 255, np.uint8)
    for j, (title, panel) in enumerate(panels):
        x0 = VIS_PAD + j * (w + VIS_PAD)
        canvas[VIS_TITLE_H:VIS_TITLE_H + h, x0:x0 + w] = panel
        _put_text(canvas, title, x0, VIS_TITLE_H - 5)
    y0 = VIS_TITLE_H + h + VIS_PAD
    for r, items in enumerate(rows):
        y = y0 + r * VIS_LEGEND_ROW_H
        for k, name, x in items:
            canvas[y + 2:y + 2 + VIS_SWATCH, x:x + VIS_SWATCH] = palette[k]
            _put_text(canvas, name, x + VIS_SWATCH + 4, y + VIS_SWATCH)
    return canvas


# ----------------------------------------------------------------------------- parent side

def check_inputs(files: SplitFiles, with_gt: bool, logits_dir: Path, suffix: str, split: str) -> None:
    """Fail before any work with the first offending id: a missing image, ground truth or map,
    or a map whose id the split does not hold (maps from another split or data set)."""
    files.check(with_gt)
    if not logits_dir.is_dir():
        raise DataError(f"logits directory not found: {logits_dir}")
    present = {p.name for p in logits_dir.iterdir()}
    missing = [i for i in files.ids if f"{i}{suffix}" not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"logits missing for id '{missing[0]}': {logits_dir / (missing[0] + suffix)}{more}")
    listed = set(files.ids)
    extra = sorted(p.stem for p in logits_dir.glob(f"*{suffix}") if p.stem not in listed)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DataError(f"logits for id '{extra[0]}' ({logits_dir / (extra[0] + suffix)}) but the id is not in "
                        f"the split list of '{split}'{more}: maps of another split? pass --split")


PRED_PATTERNS = ("*.png",)  # what run() writes into its predictions folder (and may delete)


def prediction_record(logits_dir: Path, settings: dict) -> dict:
    """The predictions' record: the maps folder's own record (so maps remade from another
    checkpoint make these predictions stale) and the settings that change them."""
    maps = provenance.folder_input(logits_dir, ("*.npy", "*.npz"))
    return provenance.make_record("test.py", {"score_maps": maps}, settings)


def pred_folder_name(logits_name: str, mode: str, crf: bool) -> str:
    """``<mode>_pred[_crf]`` for the reference's ``logits`` folder; other inference settings add
    their suffix (``val_pred_msc_flip_crf``), so a run's single-scale and multi-scale predictions
    and scores never share a folder. The storage format (``_compact``) changes no prediction."""
    suffix = logits_name[len("logits"):] if logits_name.startswith("logits") else f"_{logits_name}"
    suffix = suffix.removesuffix("_compact")
    return f"{mode}_pred{suffix}{'_crf' if crf else ''}"


def update_card(run_dir: Path, logits_dir: Path, cfg: Config, scores: dict, crf: bool, split: str,
                seconds: float) -> Path | None:
    """This prediction's row in the run's results card (engine/results_card.py), for the net and
    inference setting the maps were made with (their provenance record)."""
    # imported here: it loads torch, and test.py starts (and forks its CRF workers) without it
    from engine import results_card as card
    from engine.beco import num_nets
    from utils.config import to_dict
    record_path = logits_dir / provenance.RECORD_NAME
    record = provenance.read_record(record_path)
    if record is None or "checkpoint" not in record.get("inputs", {}):
        print(f"note: no {record_path}, so no results card row (maps not written by main.py --test)")
        return None
    made = record["settings"]
    ckpt = Path(record["inputs"]["checkpoint"]["path"])
    old = card.read_card(run_dir).get("checkpoint", {})
    if ckpt.is_file():
        entry = card.checkpoint_entry(ckpt, run_dir)
    elif old.get("path") == str(ckpt):
        entry = old  # the checkpoint was moved away since the test pass; its hash is on the card
    else:
        print(f"note: checkpoint {ckpt} of these maps is gone and not on the card: no results card row")
        return None
    row = card.make_row(scores, card.saved_net_name(num_nets(cfg)), card.inference_name(made["multi_scale"], made["flip"]),
                        crf, "original", split=split, num_images=scores["num_images"],
                        source="test.py" + (" --crf" if crf else ""))
    return card.update_card(run_dir, entry, [row], class_names=scores["class_names"], config=to_dict(cfg),
                            tool="test.py" + (" --crf" if crf else ""), seconds=seconds,
                            scales=made.get("scales"))


def write_submission(run_dir: Path, pred_dir: Path, ids: list[str], layout: Path) -> Path:
    """The evaluation-server layout (VOC's ``results/VOC2012/Segmentation/comp6_test_cls/<id>.png``)
    under ``<run>/<pred>_submission/``, and ``<run>/<pred>_submission.tar`` holding exactly the listed ids."""
    root = run_dir / f"{pred_dir.name}_submission"
    target = root / layout
    for i in ids:
        atomic_write(target / f"{i}.png", lambda tmp, src=pred_dir / f"{i}.png": shutil.copyfile(src, tmp))

    def write_tar(tmp: str) -> None:
        with tarfile.open(tmp, "w") as tar:
            for i in ids:
                tar.add(target / f"{i}.png", arcname=str(layout / f"{i}.png"))
    return atomic_write(run_dir / f"{pred_dir.name}_submission.tar", write_tar)


def print_scores(scores: dict, names: list[str]) -> None:
    # imported here: it loads torch, and test.py starts (and forks its CRF workers) without it
    from utils.metrics import iou_table
    print(iou_table(names, scores["iou"]))
    present = sum(v is not None for v in scores["iou"])
    print(f"mIoU {scores['miou']:.4f} over {present} classes present | pixel acc {scores['pixel_acc']:.4f} | "
          f"mean acc {scores['mean_acc']:.4f} | mean precision {scores['mean_precision']:.4f}")


def run(args: argparse.Namespace) -> dict:
    # imported here: it loads torch, and test.py starts (and forks its CRF workers) without it
    from utils.metrics import segmentation_scores

    logits_dir = Path(args.logits_dir)
    if not logits_dir.is_dir():
        raise DataError(f"logits folder not found: {logits_dir}")
    run_dir = logits_dir.resolve().parent
    cfg = resolve_config(args, run_dir)
    entry = dataset_entry(cfg.data.dataset)
    split = args.split or cfg.test.split
    files = entry.files(cfg.data, split)
    ids = files.ids
    with_gt = args.mode == "val"
    suffix = SUFFIX[cfg.test.logits_format]
    check_inputs(files, with_gt, logits_dir, suffix, split)
    if not with_gt and entry.submission_dir is None:
        print(f"note: {cfg.data.dataset} has no evaluation-server layout; --mode test writes the predictions only")

    pred_dir = run_dir / pred_folder_name(logits_dir.name, args.mode, args.crf)
    crf_settings = dataclasses.asdict(cfg.test.crf) if args.crf else None
    preds_plan = provenance.plan(pred_dir, prediction_record(logits_dir, {
        "split": split, "mode": args.mode, "num_classes": cfg.data.num_classes,
        "align_corners": cfg.model.align_corners, "crf": crf_settings}), PRED_PATTERNS, overwrite=args.overwrite,
        legacy="_settings.json")
    names = entry.class_names(cfg.data.num_classes)
    job = Job(files=files, with_gt=with_gt, gt_ignore_index=entry.gt_ignore_index,
              truncated_ok=cfg.data.truncated_images == "load", logits_dir=logits_dir, logits_suffix=suffix,
              pred_dir=pred_dir, vis_dir=run_dir / f"{args.mode}_vis", num_classes=cfg.data.num_classes,
              names=tuple(names), crf=cfg.test.crf if args.crf else None, crf_for_vis=cfg.test.crf,
              align_corners=cfg.model.align_corners, overwrite=args.overwrite)
    if args.n_jobs is not None and args.n_jobs < 1:
        raise ConfigError(f"--n-jobs must be >= 1, got {args.n_jobs}")
    provenance.commit(preds_plan)  # every check has passed: old predictions may go now
    # More workers than ids (or than cores) only cost start-up time and memory.
    n_jobs = min(args.n_jobs or available_cores(), len(ids))
    if args.n_jobs is not None and n_jobs < args.n_jobs:
        print(f"--n-jobs {args.n_jobs}: {len(ids)} ids, so {n_jobs} worker(s)")
    tasks = [(i, k < args.vis) for k, i in enumerate(ids)]
    print(f"{len(ids)} ids of '{split}' | {'dense CRF' + (' (pruned labels)' if cfg.test.crf.prune_labels else '') if args.crf else 'no CRF'} | "
          f"{n_jobs} worker(s), {cfg.test.chunk_size} ids per chunk | -> {pred_dir}", flush=True)

    conf = np.zeros((cfg.data.num_classes,) * 2, np.int64)
    counts = {"done": 0, "kept": 0, "capped": 0}
    t0 = time.time()
    results = parallel_map(_work, tasks, n_jobs, cfg.test.chunk_size, init=_set_job, init_args=(job,))
    try:
        for item_id, c, status, error in tqdm(results, total=len(tasks), desc=f"{args.mode}", dynamic_ncols=True):
            if error is not None:
                raise DataError(error)
            if status == "done_capped":
                counts["capped"] += 1
                status = "done"
            counts[status] += 1
            if c is not None:
                conf += c
    finally:
        results.close()  # stops the workers at once on an error; finished files stay
    elapsed = time.time() - t0
    print(f"{counts['done']} predictions written, {counts['kept']} already there (kept) | {elapsed:.1f} s "
          f"({len(ids) / max(elapsed, 1e-9):.2f} images/s)")
    if counts["capped"]:
        print(f"note: on {counts['capped']} images the compact maps lacked a class reaching "
              f"test.crf.prune_threshold (more than test.compact_max_classes were above "
              f"test.compact_threshold); their CRF labels may differ from dense maps'")

    summary = {"pred_dir": str(pred_dir), "num_images": len(ids), "written": counts["done"], "kept": counts["kept"],
               "crf_capped": counts["capped"],
               "seconds": elapsed, "scores": None, "submission": None}
    if args.mode == "val" and not conf[1:].any():
        # Over background alone the mIoU is 1.0 for an all-background prediction: no number is recorded.
        raise DataError(f"none of the {len(ids)} ground-truth maps of '{split}' under {files.gt_dir} has a "
                        f"foreground pixel: its mIoU would mean nothing; is this the right split and data root?")
    if args.mode == "val":
        scores = segmentation_scores(conf)
        # "iou" is a list in class-id order beside "class_names" (the JSON writer sorts mapping keys).
        record = {"split": split, "num_images": len(ids), "logits_dir": str(logits_dir), "crf": crf_settings,
                  "resolution": "original", "class_names": names, **scores}
        scores_path = save_json(run_dir / f"{pred_dir.name}_scores.json", record)
        print_scores(scores, names)
        print(f"scores: {scores_path}")
        card_path = update_card(run_dir, logits_dir, cfg, record, args.crf, split, elapsed)
        if card_path is not None:
            print(f"results card: {card_path.with_suffix('.md')}")
        summary["scores"] = record
    elif entry.submission_dir is not None:
        tar_path = write_submission(run_dir, pred_dir, ids, Path(entry.submission_dir))
        print(f"server layout: {run_dir / (pred_dir.name + '_submission') / entry.submission_dir} | tar: {tar_path}")
        summary["submission"] = str(tar_path)
    if args.vis:
        print(f"pictures: {job.vis_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # config and usage errors exit 2, data errors 1; anything else is a bug
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

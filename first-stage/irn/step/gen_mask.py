"""Step gen_mask (spec §14): confidence masks for the second stage from the score files.

The rule, its variants and the precision counts live in ``datasets/handoff.py`` (the synthetic
generators apply the same rule); this step reads the score files and writes the masks.

Per image, with ``score`` (K+1, H, W) and ``pred`` (H, W) from ``<score_dir>/<id>.pt``:

1. margin = top-1 score − top-2 score per pixel. QUIRK-13 (KEEP, ``margin_tie_mode original``):
   the reference zeroes *every* entry equal to the top-1 value before taking top-2, so a tie
   gives top-1 minus the next strictly smaller value; ``zero`` gives the textbook margin 0.
2. In every class region of ``pred`` (background included, classes ascending), the
   ``int(n_c / (1/thd))`` pixels with the largest margins are marked confident (half for thd
   0.5). Equal margins: stable order, earlier row-major pixel first (QUIRK-14 fixed).
3. ``<mask_out_dir>/<id>.png``: 8-bit RGB, all channels equal, 255 = confident, 0 otherwise
   (what the reference's torchvision save_image wrote, and what the second stage reads).

Images without any class (COCO; score file with the background plane only, keys [0]): the
reference wrote an unseeded random 50 % mask at the stride-4 CAM size (QUIRK-15). Fixed: the mask
has the image's full H×W and ``--no_class_mask`` chooses it: ``random_half`` (default) marks
``int(N / (1/mask_thd))`` of the N pixels (= floor(N/2)), drawn from a generator seeded by
(``--seed``, id), so a rerun gives the same mask; ``zero`` marks none. The pseudo-label stays all
background. Such images are counted in the summary (``no_class_images``, the first
``no_class_ids``) and named in a warning; an existing mask of another policy is kept without
``--overwrite`` and counted (``no_class_masks_of_other_policy``).

Ids come from ``train_list``, not from whatever files the score folder holds (QUIRK-26). Score
files of the reference (numpy ``pred``/``keys``, score tensors saved on a GPU or as float16)
are read too. Standalone use on any score folder:

    python first-stage/irn/step/gen_mask.py --score_dir DIR --out_dir DIR --ids LIST \\
        [--voc12_root R | --dataset coco --coco_root R] [--seed S] [--no_class_mask random_half|zero]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from datasets.handoff import (NO_CLASS_MASKS, TIE_MODES, confidence_mask, keep_count, mask_precision,
                              no_class_mask, precision_counts, save_mask)
from datasets.readers import read_id_list
from datasets.sources import VOC_STATS_GT_DIRS
from datasets.verify import no_class_sentence, policy_text, shown
from datasets.views import data_source, open_source
from irn.misc.runtime import get_logger, progress, read_ids
from irn.misc.settings import config_path, load_settings
from models.checkpoint import read_torch_file
from utils.errors import CheckpointError, DataError, exit_status

# Ground truth used for the VOC mask statistics, first one found per id (SBD-augmented labels
# cover all of train_aug; VOC's own only train/val). COCO: mask/<split>2014/<int id>.png.
GT_DIRS = VOC_STATS_GT_DIRS
IGNORE = 255
NO_CLASS_IDS_SHOWN = 10  # ids of images without class kept in the summary


class ScoreFileError(DataError):
    """Missing or malformed score file; the message names the id and path."""


def _numpy_safe_globals() -> list[Any]:
    """What a reference score file needs beyond tensors: numpy arrays (``pred``, ``keys``).

    Old numpy pickles name the reconstructor ``numpy.core.multiarray`` (numpy 2 moved it to
    ``numpy._core``), hence the explicit alias.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed: list[Any] = [np.ndarray, np.dtype, _reconstruct,
                          (_reconstruct, "numpy.core.multiarray._reconstruct"),
                          (_reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_score(path: str | Path, item_id: str | None = None) -> dict[str, Any]:
    """Read a score file (ours or the reference's) → {pred int64 ndarray, score CPU tensor, keys int64 ndarray}.

    Tensors saved on a GPU are mapped to the CPU. Loading is restricted to tensors and numpy
    arrays (``weights_only``); a file that needs more is refused, naming what it holds.
    """
    path = Path(path)
    name = item_id or path.stem
    if not path.is_file():
        raise ScoreFileError(f"score file missing for id '{name}': {path} (run make_sem_seg first)")
    try:
        # Never unpickled in full: a score file that names other Python objects could run code.
        data = read_torch_file(path, allowed=_numpy_safe_globals())
    except CheckpointError as e:
        raise ScoreFileError(f"score file for id '{name}' is unreadable: {e}") from None
    if not isinstance(data, dict) or not {"pred", "score"} <= set(data):
        raise ScoreFileError(f"score file for id '{name}' is not a dict with 'pred' and 'score': {path}")
    score = torch.as_tensor(data["score"]).detach().cpu()
    pred = np.asarray(data["pred"].detach().cpu() if isinstance(data["pred"], torch.Tensor) else data["pred"]
                      ).astype(np.int64)
    if score.dim() != 3 or tuple(score.shape[1:]) != pred.shape:
        raise ScoreFileError(f"score file for id '{name}': score {tuple(score.shape)} does not fit pred "
                             f"{pred.shape}: {path}")
    # The margins rank pixels by score: a NaN would be kept or dropped by sort order alone.
    bad = int((~torch.isfinite(score)).sum())
    if bad:
        raise ScoreFileError(f"score file for id '{name}' holds NaN/Inf at {bad} values: {path}")
    keys = data.get("keys")
    if keys is not None:
        keys = np.asarray(keys.detach().cpu() if isinstance(keys, torch.Tensor) else keys).astype(np.int64)
    return {"pred": pred, "score": score, "keys": keys}


def read_mask_png(path: str | Path) -> np.ndarray:
    """(H, W) uint8 0/1 from a mask PNG (any channel count)."""
    from PIL import Image
    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return (arr > 0).astype(np.uint8)


def is_no_class(data: dict[str, Any]) -> bool:
    """A score file of an image without any class: the background plane alone (keys [0])."""
    keys = data.get("keys")
    if keys is not None:
        return bool(np.asarray(keys).size == 1)
    return int(data["score"].shape[0]) == 1


def no_class_policy_of(mask: np.ndarray, thd: float = 0.5) -> str | None:
    """The ``--no_class_mask`` value a no-class mask was made with, from its pixel count (None: neither)."""
    kept = int((np.asarray(mask) > 0).sum())
    if kept == 0:
        return "zero"
    return "random_half" if kept == keep_count(np.asarray(mask).size, thd) else None


def _voc_gt_reader(voc12_root: Path | None) -> Callable[[str], np.ndarray | None]:
    """GT for the statistics from a VOC root (SegmentationClassAug, else SegmentationClass)."""
    if voc12_root is None:
        return lambda name: None
    return open_source("voc", voc12_root).stats_gt


def generate_masks(ids: list[str], score_root: Path, mask_root: Path, thd: float = 0.5,
                   tie_mode: str = "original", voc12_root: Path | None = None, overwrite: bool = False,
                   show_progress: bool = True, *, gt_of: Callable[[str], np.ndarray | None] | None = None,
                   no_class: str = "random_half", seed: int = 0) -> dict[str, Any]:
    """Write a mask per id; returns kept share and, where GT exists, the label precision of
    the kept (and of the unkept) pixels, GT void ignored.

    ``gt_of(id)``: the GT (int64, void −1) or None; default from ``voc12_root`` (VOC layout).
    ``no_class`` / ``seed``: the mask of images without classes (``no_class_mask``).
    """
    if no_class not in NO_CLASS_MASKS:
        raise ValueError(f"no_class_mask must be one of {NO_CLASS_MASKS}, got {no_class!r}")
    gt_of = gt_of or _voc_gt_reader(voc12_root)
    mask_root.mkdir(parents=True, exist_ok=True)
    stats = {"pixels": 0, "kept": 0, "kept_valid": 0, "kept_correct": 0, "unkept_valid": 0,
             "unkept_correct": 0, "with_gt": 0, "written": 0}
    no_class_ids: list[str] = []
    stale: list[str] = []  # existing no-class masks of another --no_class_mask
    for name in progress(ids, "gen_mask", enabled=show_progress):
        out = mask_root / f"{name}.png"
        data = load_score(score_root / f"{name}.pt", name)
        pred = data["pred"]
        empty = is_no_class(data)
        if empty:
            no_class_ids.append(name)
        if out.is_file() and not overwrite:
            mask = read_mask_png(out)
            if mask.shape != pred.shape:
                raise DataError(f"existing mask for id '{name}' is {mask.shape}, its pred is {pred.shape}: {out} "
                                 "(pass --overwrite)")
            if empty and no_class_policy_of(mask, thd) != no_class:
                stale.append(name)
        else:
            if empty:
                mask = no_class_mask(pred.shape, name, seed, no_class, thd)
            else:
                mask = confidence_mask(data["score"], pred, thd, tie_mode)
            save_mask(out, mask)
            stats["written"] += 1
        stats["pixels"] += mask.size
        stats["kept"] += int(mask.sum())
        gt = gt_of(name)
        if gt is not None:
            if gt.shape != pred.shape:
                raise DataError(f"id '{name}': ground truth is {gt.shape}, pred is {pred.shape}")
            stats["with_gt"] += 1
            for key, n in precision_counts(pred, mask, gt, gt >= 0).items():
                stats[key] += n

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"images": len(ids), "written": stats["written"], "kept_fraction": ratio(stats["kept"], stats["pixels"]),
            "images_with_gt": stats["with_gt"],
            **mask_precision(stats),
            "mask_thd": thd, "margin_tie_mode": tie_mode, "no_class_images": len(no_class_ids),
            "no_class_ids": no_class_ids, "no_class_mask": no_class, "no_class_masks_of_other_policy": len(stale)}


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    ids = read_ids(args, "train_list")  # QUIRK-26: driven by the id list
    score_root, mask_root = Path(args.score_dir), Path(args.mask_out_dir)
    source = data_source(args)
    out = generate_masks(ids, score_root, mask_root, thd=args.mask_thd, tie_mode=args.margin_tie_mode,
                         overwrite=args.overwrite, show_progress=not args.no_progress, gt_of=source.stats_gt,
                         no_class=args.no_class_mask, seed=args.seed)
    prec = out["kept_precision"]
    log.info(f"gen_mask: {len(ids)} masks ({out['written']} written), kept {100 * out['kept_fraction']:.1f} % of "
             f"pixels" + (f", label precision of kept pixels {100 * prec:.2f} % (unkept "
                          f"{100 * out['unkept_precision']:.2f} %) on {out['images_with_gt']} images with GT"
                          if prec is not None else ", no ground truth for precision"))
    every = out["no_class_ids"]
    out["no_class_ids"] = every[:NO_CLASS_IDS_SHOWN]  # the summary keeps the first few
    if every:
        log.warning(f"gen_mask: {no_class_sentence(len(every), policy_text(out['no_class_mask'], args.mask_thd))} "
                    f"(full size, seed {args.seed}); ids {shown(every)}")
    if out["no_class_masks_of_other_policy"]:
        log.warning(f"gen_mask: {out['no_class_masks_of_other_policy']} existing mask(s) of images without class were "
                    f"made with another --no_class_mask than {out['no_class_mask']} and were kept; pass --overwrite "
                    "to remake them")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Confidence masks from a score folder (ours or the reference's).")
    p.add_argument("--score_dir", type=Path, required=True, help="folder of <id>.pt score files")
    p.add_argument("--out_dir", type=Path, required=True, help="mask folder (created)")
    p.add_argument("--ids", type=Path, required=True, help="id list file (one id per line)")
    p.add_argument("--voc12_root", type=Path, default=None, help="VOC: for precision statistics against the GT")
    p.add_argument("--dataset", choices=("voc", "coco"), default="voc",
                   help="layout of the GT for the statistics; the values of the options below not given are "
                        "configs/first_stage/<dataset>.yaml's")
    p.add_argument("--coco_root", type=Path, default=None, help="COCO: prepared tree, for precision statistics")
    p.add_argument("--mask_thd", type=float)
    p.add_argument("--margin_tie_mode", choices=TIE_MODES)
    p.add_argument("--no_class_mask", choices=NO_CLASS_MASKS,
                   help="QUIRK-15: mask of images without classes (full size; seeded random half, or none)")
    p.add_argument("--seed", type=int, help="seeds the no-class masks (with the id)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    settings = load_settings(config_path(a.dataset))
    for key in ("mask_thd", "margin_tie_mode", "no_class_mask", "seed"):
        if getattr(a, key) is None:
            setattr(a, key, getattr(settings, key))
    gt_of = None
    if a.dataset == "coco" and a.coco_root is not None:
        gt_of = open_source("coco", a.coco_root).stats_gt
    out = generate_masks(read_id_list(a.ids), a.score_dir, a.out_dir, a.mask_thd, a.margin_tie_mode,
                         a.voc12_root if a.dataset == "voc" else None, a.overwrite, not a.no_progress,
                         gt_of=gt_of, no_class=a.no_class_mask, seed=a.seed)
    out["no_class_ids"] = out["no_class_ids"][:NO_CLASS_IDS_SHOWN]
    print(out)
    return out


__all__ = ["run", "main", "load_score", "read_mask_png", "generate_masks", "ScoreFileError", "is_no_class",
           "no_class_policy_of"]


def cli(argv: list[str] | None = None) -> int:
    """The standalone command: the project's errors in one line on stderr (exit 1, options 2)."""
    return exit_status(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())


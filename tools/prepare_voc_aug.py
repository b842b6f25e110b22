"""Prepare PASCAL VOC 2012 + SBD for this project (the "train_aug" set, first-stage spec §4.1).

    python tools/prepare_voc_aug.py --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset

1. ``SegmentationClassAug/<id>.png``: every SBD ``cls/<id>.mat`` (struct ``GTcls``, field
   ``Segmentation``) as a palette PNG of raw class ids, then VOC's own
   ``SegmentationClass/<id>.png`` copied over it (VOC's labels are the finer ones, with the
   255 void band, and they are what the evaluation uses).
2. ``ImageSets/Segmentation/train_aug.txt`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted
   (10 582 ids for the real data sets).
3. ``cls_labels.json`` in the VOC folder: image-level labels of train_aug ∪ VOC train ∪ VOC val
   from ``Annotations/<id>.xml`` (a class is present if any object names it, difficult and
   truncated ones included) — read by the first stage (``--cls_labels``, default location).

``--labels_only`` does step 3 alone for a VOC-format tree that already has its lists (e.g. the
synthetic data). Existing PNGs are kept unless ``--overwrite``; every file is written atomically.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from datasets.prepare.cls_labels import DEFAULT_NAME, labels_from_xml, save_cls_labels
from utils.io import atomic_write, save_png, save_text
from utils.voc import VOC_CLASSES, voc_palette

SBD_MAX_LABEL = len(VOC_CLASSES) - 1  # SBD has no void label: values 0..20


class PrepareError(ValueError):
    """Bad input tree; the message names the file."""


def find_voc_root(path: Path) -> Path:
    """Accept VOC2012/ itself, or VOCdevkit/ containing it."""
    for cand in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise PrepareError(f"no VOC2012 folder (with JPEGImages/) at or under {path}")


def find_sbd_root(path: Path) -> Path:
    """Accept SBD's dataset/ folder, or benchmark_RELEASE/ (or its parent) containing it."""
    for cand in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir():
            return cand
    raise PrepareError(f"no SBD dataset folder (with cls/) at or under {path}")


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"list file not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_sbd_mat(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD cls .mat file as uint8 (H, W)."""
    from scipy.io import loadmat
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as e:  # noqa: BLE001 - scipy raises several types for corrupt files
        raise PrepareError(f"cannot read SBD file {path}: {e}") from None
    if "GTcls" not in mat:
        raise PrepareError(f"{path} has no 'GTcls' struct (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    gt = mat["GTcls"]
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise PrepareError(f"{path}: GTcls has no 'Segmentation' field")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise PrepareError(f"{path}: Segmentation has shape {seg.shape}, expected (H, W)")
    if seg.size and (seg.min() < 0 or seg.max() > SBD_MAX_LABEL):
        raise PrepareError(f"{path}: Segmentation values {int(seg.min())}..{int(seg.max())} outside 0..{SBD_MAX_LABEL}")
    return seg.astype(np.uint8)


def train_aug_ids(sbd_train: list[str], sbd_val: list[str], voc_train: list[str], voc_val: list[str]) -> list[str]:
    """(SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def _progress(it, desc: str, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, total=total, unit="file")


def write_cls_labels(voc: Path, ids: list[str], out: Path | None = None) -> Path:
    missing = [i for i in ids if not (voc / "Annotations" / f"{i}.xml").is_file()]
    if missing:
        raise PrepareError(f"annotation missing for id '{missing[0]}': {voc / 'Annotations' / (missing[0] + '.xml')}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return save_cls_labels(out or voc / DEFAULT_NAME, labels_from_xml(voc / "Annotations", ids))


def prepare(voc: Path, sbd: Path | None, overwrite: bool = False, progress: bool = True,
            labels_only: bool = False) -> dict:
    voc = find_voc_root(voc)
    lists = voc / "ImageSets" / "Segmentation"
    voc_train = read_list(lists / "train.txt")
    voc_val = read_list(lists / "val.txt")
    summary: dict = {"voc": str(voc)}
    if labels_only:
        aug = read_list(lists / "train_aug.txt") if (lists / "train_aug.txt").is_file() else []
    else:
        if sbd is None:
            raise PrepareError("--sbd is required (or pass --labels_only)")
        sbd = find_sbd_root(sbd)
        sbd_train = read_list(sbd / "train.txt")
        sbd_val = read_list(sbd / "val.txt")
        aug = train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)
        no_image = [i for i in aug if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
        if no_image:
            raise PrepareError(f"train_aug id '{no_image[0]}' has no image {voc / 'JPEGImages' / (no_image[0] + '.jpg')}"
                               + (f" (and {len(no_image) - 1} more)" if len(no_image) > 1 else ""))
        out_dir = voc / "SegmentationClassAug"
        out_dir.mkdir(exist_ok=True)
        palette = voc_palette()
        sbd_ids = sorted(set(sbd_train) | set(sbd_val))
        voc_labelled = sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
        voc_set = set(voc_labelled)
        converted = 0
        # SBD first for ids VOC does not label itself; VOC's own files win where both exist.
        sbd_only = [i for i in sbd_ids if i not in voc_set]
        for i in _progress(sbd_only, "SBD .mat -> png", len(sbd_only), progress):
            dst = out_dir / f"{i}.png"
            if dst.is_file() and not overwrite:
                continue
            mat = sbd / "cls" / f"{i}.mat"
            if not mat.is_file():
                raise PrepareError(f"SBD list names id '{i}' but {mat} is missing")
            save_png(dst, read_sbd_mat(mat), palette=palette)
            converted += 1
        copied = 0
        for i in _progress(voc_labelled, "VOC png -> aug", len(voc_labelled), progress):
            dst = out_dir / f"{i}.png"
            if dst.is_file() and not overwrite:
                continue
            atomic_write(dst, lambda tmp, src=voc / "SegmentationClass" / f"{i}.png": shutil.copyfile(src, tmp))
            copied += 1
        no_label = [i for i in aug if not (out_dir / f"{i}.png").is_file()]
        if no_label:
            raise PrepareError(f"train_aug id '{no_label[0]}' has neither an SBD nor a VOC label "
                               f"(expected {out_dir / (no_label[0] + '.png')})")
        save_text(lists / "train_aug.txt", "".join(f"{i}\n" for i in aug))
        summary.update({"sbd": str(sbd), "sbd_converted": converted, "voc_copied": copied})
    label_ids = sorted(set(aug) | set(voc_train) | set(voc_val))
    labels_path = write_cls_labels(voc, label_ids)
    summary.update({"train_aug": len(aug), "cls_labels": str(labels_path), "cls_label_ids": len(label_ids)})
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, required=True, help="VOCdevkit/VOC2012 (or VOCdevkit)")
    p.add_argument("--sbd", type=Path, default=None, help="SBD benchmark_RELEASE/dataset (with cls/, train.txt, val.txt)")
    p.add_argument("--labels_only", action="store_true", help="only write cls_labels.json from the XML files")
    p.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        s = prepare(args.voc, args.sbd, overwrite=args.overwrite, progress=not args.quiet, labels_only=args.labels_only)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = "" if args.labels_only else f"; SBD converted {s['sbd_converted']}, VOC copied {s['voc_copied']}"
    print(f"{s['voc']}: train_aug {s['train_aug']} ids{extra}; image-level labels for {s['cls_label_ids']} ids "
          f"in {s['cls_labels']} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

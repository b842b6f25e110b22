"""COCO 2014 as a data set of this project: class table, file naming, layout (spec
segmenters-and-coco.md §2, first-stage.md §16).

Files on disk (``tools/prepare_coco.py`` writes everything under ``mask/``, ``lists/``
and the class-label files from ``annotations/instances_{train,val}2014.json``):

    <root>/train2014/COCO_train2014_<12-digit id>.jpg      images (val2014/ alike)
    <root>/mask/{train,val}2014/<int id>.png               ground truth, uint8 L, 0..80, no void
    <root>/lists/{train,val}2014.txt                       file stems, ascending image id
    <root>/cls_labels_{train,val}2014.json                 image-level labels, keyed by stem
    <pseudo_label_dir>/<stem>.png, <mask_dir>/<stem>.png   first-stage outputs

Names: a sample's id is its file stem (``COCO_val2014_000000000042``); pseudo-labels,
masks and score maps are named by it, the ground truth by the integer image id
(``42.png``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from datasets.readers import DataError, SplitFiles, read_split, require_dir
from utils.config import DataCfg

# The 80 category ids of the instances files (sparse: 12, 26, 29, 30, 45, 66, 68, 69, 71,
# 83 are unused) with their names. Label id = 1 + position here (ascending category id);
# 0 is background, so there are 81 classes (first-stage §16.1).
CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
CATEGORY_TO_LABEL: dict[int, int] = {cat: k + 1 for k, (cat, _) in enumerate(CATEGORIES)}
COCO_CLASSES: tuple[str, ...] = ("background",) + tuple(name for _, name in CATEGORIES)
NUM_CLASSES = len(COCO_CLASSES)  # 81
SPLITS = ("train", "val")
YEAR = "2014"

_STEM = re.compile(r"^COCO_(train|val)2014_(\d{12})$")


def split_folder(split: str) -> str:
    """``train`` -> ``train2014``: the image folder, and the ground-truth folder under ``mask/``."""
    if split not in SPLITS:
        raise ValueError(f"COCO split must be one of {SPLITS}, got {split!r}")
    return f"{split}{YEAR}"


def stem_of(split: str, image_id: int) -> str:
    """``('val', 42)`` -> ``COCO_val2014_000000000042``, the name of every per-image file but the GT."""
    return f"COCO_{split_folder(split)}_{int(image_id):012d}"


def image_id_of(stem: str) -> int:
    """``COCO_val2014_000000000042`` -> 42 (the ground truth's name, ``42.png``)."""
    m = _STEM.match(stem)
    if m is None:
        raise ValueError(f"not a COCO 2014 file stem (COCO_<train|val>2014_<12 digits>): {stem!r}")
    return int(m.group(2))


def split_of(stem: str) -> str:
    """``COCO_val2014_000000000042`` -> ``val``."""
    m = _STEM.match(stem)
    if m is None:
        raise ValueError(f"not a COCO 2014 file stem (COCO_<train|val>2014_<12 digits>): {stem!r}")
    return m.group(1)


def gt_name(stem: str) -> str:
    return f"{image_id_of(stem)}.png"


def list_name(split: str) -> str:
    return f"{split_folder(split)}.txt"


def cls_labels_name(split: str) -> str:
    return f"cls_labels_{split_folder(split)}.json"


def listed_stems(image_dir: Path) -> list[str]:
    """Stems of the ``*.jpg`` files of a COCO image folder, sorted: the reference's sample order
    (it lists the folder, spec §2.1), ascending image id for COCO's names. Other files are
    not samples (QUIRK-S2: the reference takes every file)."""
    return sorted(p.stem for p in image_dir.glob("*.jpg"))


def coco_files(root: str | Path, split: str, list_dir: str | None = None, gt_dir: str | None = "mask") -> SplitFiles:
    """The files of COCO's ``split`` (train | val) under ``root``.

    Ids come from ``<root>/<list_dir>/<split>2014.txt`` (``tools/prepare_coco.py`` writes
    ``lists/``) or, with ``list_dir`` None, from the image folder's listing. Ground truth
    ``<root>/<gt_dir>/<split>2014/<int id>.png``; ``gt_dir`` None: none. Every id must be a
    COCO file stem of this split (a stray ``photo.jpg`` is refused, naming the file).
    """
    root = Path(root)
    folder = split_folder(split)
    image_dir = require_dir(root / folder, "COCO image")
    if list_dir is None:
        ids = listed_stems(image_dir)
        source = image_dir
    else:
        ids = read_split(root / list_dir, folder)
        source = root / list_dir / list_name(split)
    if not ids:
        raise DataError(f"no COCO images in {source}")
    prefix = f"COCO_{folder}_"
    bad = [i for i in ids if not (i.startswith(prefix) and _STEM.match(i))]
    if bad:
        raise DataError(f"'{bad[0]}' ({source}) is not a COCO {folder} file stem ({prefix}<12 digits>)"
                        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return SplitFiles(ids, image_dir, None if gt_dir is None else root / gt_dir / folder, gt_name)


@dataclass
class CocoDataCfg(DataCfg):
    # null: every *.jpg of <root>/<split>2014, sorted (the reference's order); else the id
    # lists <root>/<list_dir>/<split>2014.txt that tools/prepare_coco.py writes.
    list_dir: Optional[str]
    gt_dir: str              # ground truth under <root>/<gt_dir>/<split>2014/<int id>.png
    val_split: Literal["val", "train"]


def train_split(cfg: CocoDataCfg) -> str:
    return "train"


def files(cfg: CocoDataCfg, split: str) -> SplitFiles:
    return coco_files(cfg.root, split, cfg.list_dir, cfg.gt_dir)

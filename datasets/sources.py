"""Where the first stage's data comes from: one small object per run over a registered data set.

A data set's entry in ``datasets/build.py`` names its class table, its void value and its
layout (``first_stage``: one of the classes here); ``datasets.views.open_source`` builds the
source of a run from it. A source answers, for the roles the steps use,

    train   CAM/IRN training, make_cam, cam_to_ir_label, make_sem_seg, gen_mask, export
    val     the CAM training's validation loss
    infer   IRN's mean-shift calibration pass
    eval    eval_cam / eval_sem_seg (and the seed / mask statistics)

the ids (cut to ``--max_images``), and per id the image path, the ground-truth path and the
image-level labels; the class counts follow from the entry's class table (background first):

| dataset | foreground classes C | label values | GT void value | truncated JPEGs |
|---|---|---|---|---|
| ``voc``  | 20 | 21 (0..20) | 255 | refused |
| ``coco`` | 80 | 81 (0..80) | none | decoded as far as they go (spec §16.2) |

VOC layout (``VOCSource``; PASCAL VOC and any set in its layout): ``<root>/JPEGImages/<id>.jpg``,
ground truth ``SegmentationClass/<id>.png``, lists ``--train_list`` / ``--val_list`` /
``--infer_list`` (default ``ImageSets/Segmentation/{train_aug,val,train}.txt``), eval split
``ImageSets/Segmentation/<chainer_eval_set>.txt``, labels ``--cls_labels`` (default
``<root>/cls_labels.json``, else the XML annotations, read with the entry's class names).

COCO layout (``CocoSource``): the tree of ``tools/prepare_coco.py`` (see ``datasets/coco.py``);
ids are file stems (``COCO_train2014_000000000009``) and every first-stage output is named by
them, the ground truth by the integer image id (``mask/train2014/9.png``). Lists default to
``lists/train2014.txt`` (train, infer) and ``lists/val2014.txt`` (val); the eval split
``--chainer_eval_set`` train (default) / val means ``lists/<split>2014.txt`` with
``mask/<split>2014`` ground truth. Labels come from ``cls_labels_<split>2014.json`` of the
stem's split (an image may have none), or all from one ``--cls_labels`` file keyed by stem.

Reading goes through ``datasets/readers.py``; every error is a ``DataError`` naming the id and
the file (a VOC annotation error is a ``LabelDataError``, also a ``LabelError``). The checks
(``check_images``, ``check_gt``, ``check_labels``) read every id up front and name the first bad
one and how many fail.
Sources are picklable (loader workers, spawned CRF and GPU processes); label files are read
lazily, once per process.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datasets import coco as coco_meta
from datasets.prepare.cls_labels import ClassLabels, LabelError, load_cls_labels, multi_hot
from datasets.readers import DataError, SplitFiles, read_id_list, read_image, read_label
from utils.voc import IGNORE_INDEX

ROLES = ("train", "val", "infer", "eval")
# The pipeline's own label maps (ir_label seeds) mark "unknown" with this value, for every data set.
SEED_IGNORE = IGNORE_INDEX

VOC_IMAGE_DIR = "JPEGImages"
VOC_GT_DIR = "SegmentationClass"
VOC_LIST_DIR = Path("ImageSets") / "Segmentation"
VOC_DEFAULT_LISTS = {"train": "train_aug.txt", "val": "val.txt", "infer": "train.txt"}
# gen_mask's statistics: SBD-augmented ground truth first (it covers all of train_aug).
VOC_STATS_GT_DIRS = ("SegmentationClassAug", VOC_GT_DIR)

COCO_LIST_DIR = "lists"
COCO_GT_DIR = "mask"
COCO_DEFAULT_SPLITS = {"train": "train", "val": "val", "infer": "train"}


class LabelDataError(LabelError, DataError):
    """A missing or malformed annotation / class-label file: a ``datasets.prepare.cls_labels.LabelError``
    that is also the project's DataError (whether or not LabelError itself is one); the message
    names the id and the file."""


def count_note(bad: int, total: int, what: str) -> str:
    """`` (3 of 10 ids have no image)``: the count that follows the first bad id of a check."""
    return f" ({bad} of {total} ids {what})"


class DataSource(ABC):
    """Common part; see the module docstring. Subclasses know their layout's files and labels.

    ``name``: the data set's key in the registry; ``classes``: its label names, background
    first; ``gt_ignore``: the void value of its ground truth (None: every pixel counts).
    """

    allow_truncated: bool = False

    def __init__(self, name: str, classes: Sequence[str], gt_ignore: int | None, root: str | Path,
                 lists: dict[str, str | Path | None] | None = None, eval_set: str = "train",
                 max_images: int | None = None, cls_labels: str | Path | None = None):
        self.name = name
        self.classes = tuple(classes)
        self.num_labels = len(self.classes)      # label values 0..C of pseudo-labels and ground truth
        self.num_classes = self.num_labels - 1   # foreground classes C: CAM channels, multi-hot length
        self.gt_ignore = gt_ignore
        self.root = Path(root)
        self.lists = {r: (Path(p) if p else None) for r, p in (lists or {}).items()}
        self.eval_set = eval_set
        self.max_images = max_images
        self.cls_labels = Path(cls_labels) if cls_labels else None
        self._labels_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ ids

    @abstractmethod
    def list_path(self, role: str) -> Path:
        """Each layout's own (VOCSource, CocoSource)."""

    def _read_list(self, role: str) -> list[str]:
        return read_id_list(self.list_path(role))

    def ids(self, role: str) -> list[str]:
        """The ids of a role; train/val/infer cut to ``max_images``, eval kept to the cut train ids."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        ids = self._read_list(role)
        if not self.max_images:
            return ids
        if role == "eval":
            kept = set(self.ids("train"))
            return [i for i in ids if i in kept]
        return ids[: self.max_images]

    # ------------------------------------------------------------------ files

    @abstractmethod
    def files_of(self, item_id: str) -> SplitFiles:
        """Each layout's own (VOCSource, CocoSource)."""

    def image_path(self, item_id: str) -> Path:
        return self.files_of(item_id).image(item_id)

    def gt_path(self, item_id: str) -> Path:
        return self.files_of(item_id).gt(item_id)

    def check_images(self, ids: Sequence[str]) -> None:
        """Every id's image exists; fails naming the first missing one and the count (before any
        worker starts)."""
        missing = [i for i in ids if not self.image_path(i).is_file()]
        if missing:
            raise DataError(f"image missing for id '{missing[0]}': {self.image_path(missing[0])}"
                            f"{count_note(len(missing), len(ids), 'have no image')}")

    def check_gt(self, ids: Sequence[str]) -> None:
        missing = [i for i in ids if not self.gt_path(i).is_file()]
        if missing:
            raise DataError(f"ground truth missing for id '{missing[0]}': {self.gt_path(missing[0])}"
                            f"{count_note(len(missing), len(ids), 'have no ground truth')}")

    # ------------------------------------------------------------------ readers

    def read_image(self, item_id: str) -> np.ndarray:
        """RGB uint8 (H, W, 3); grey JPEGs become 3-channel."""
        return np.array(read_image(self.image_path(item_id), item_id, allow_truncated=self.allow_truncated))

    def read_gt(self, item_id: str) -> np.ndarray:
        """Ground truth as int64 (H, W), the void value (if any) mapped to −1 (chainercv's rule, §8)."""
        return self._read_gt_at(self.gt_path(item_id), item_id)

    def _read_gt_at(self, path: Path, item_id: str) -> np.ndarray:
        gt = np.array(read_label(path, item_id, self.num_labels, "ground truth", self.gt_ignore), dtype=np.int64)
        if self.gt_ignore is not None:
            gt[gt == self.gt_ignore] = -1
        return gt

    def stats_gt(self, item_id: str) -> np.ndarray | None:
        """Ground truth for optional statistics (gen_mask): as ``read_gt`` or None if there is none."""
        try:
            path = self.gt_path(item_id)
        except (ValueError, DataError):
            return None
        return self.read_gt(item_id) if path.is_file() else None

    def read_label_map(self, path: str | Path, item_id: str, what: str = "label") -> np.ndarray:
        """A pipeline label map (ir_label seeds, pseudo-labels): uint8 (H, W), 0..C and 255."""
        return np.array(read_label(Path(path), item_id, self.num_labels, what, SEED_IGNORE), dtype=np.uint8)

    # ------------------------------------------------------------------ image-level labels

    @abstractmethod
    def labels(self, item_id: str) -> list[int]:
        """Ascending 0-based class indices present in the image (may be empty)."""

    def label_vector(self, item_id: str) -> np.ndarray:
        """float32 multi-hot of length ``num_classes``."""
        return multi_hot(self.labels(item_id), self.num_classes)

    def check_labels(self, ids: Sequence[str]) -> list[str]:
        """Every id has usable image-level labels; returns the ids without any class.

        Reads them all now (a missing or malformed annotation is found before any worker
        starts) and fails naming the first bad id, its file and how many ids fail.
        """
        bad: list[DataError] = []
        empty: list[str] = []
        for i in ids:
            try:
                if not self.labels(i):
                    empty.append(i)
            except DataError as e:
                bad.append(e)
        if bad:
            raise type(bad[0])(f"{bad[0]}{count_note(len(bad), len(ids), 'have no usable image-level labels')}")
        return empty

    @abstractmethod
    def describe(self) -> str:
        """Each layout's own (VOCSource, CocoSource)."""

    def __getstate__(self) -> dict[str, Any]:
        # Label tables are re-read where needed: a spawned process gets a light object.
        state = dict(self.__dict__)
        state["_labels_cache"] = {}
        return state


class VOCSource(DataSource):
    """A tree in PASCAL VOC's layout: VOC itself, or any data set registered with this layout."""

    allow_truncated = False  # VOC's strictness: a truncated JPEG is an error

    def __init__(self, name: str, classes: Sequence[str], gt_ignore: int | None, root: str | Path,
                 lists: dict[str, str | Path | None] | None = None, eval_set: str = "train",
                 max_images: int | None = None, cls_labels: str | Path | None = None):
        super().__init__(name, classes, gt_ignore, root, lists, eval_set, max_images, cls_labels)
        self.files = SplitFiles([], self.root / VOC_IMAGE_DIR, self.root / VOC_GT_DIR)

    def list_path(self, role: str) -> Path:
        if role == "eval":
            return self.root / VOC_LIST_DIR / f"{self.eval_set}.txt"
        return self.lists.get(role) or self.root / VOC_LIST_DIR / VOC_DEFAULT_LISTS[role]

    def files_of(self, item_id: str) -> SplitFiles:
        return self.files

    def stats_gt(self, item_id: str) -> np.ndarray | None:
        for d in VOC_STATS_GT_DIRS:
            path = self.root / d / f"{item_id}.png"
            if path.is_file():
                return self._read_gt_at(path, item_id)
        return None

    @property
    def class_labels(self) -> ClassLabels:
        if "table" not in self._labels_cache:
            try:
                self._labels_cache["table"] = ClassLabels(self.root, self.cls_labels, self.classes[1:])
            except LabelDataError:
                raise
            except (LabelError, ValueError) as e:  # ValueError: a label file that is not JSON
                raise LabelDataError(f"image-level labels: {e}") from None
        return self._labels_cache["table"]

    def labels(self, item_id: str) -> list[int]:
        table = self.class_labels
        try:
            return table.indices(item_id)
        except LabelDataError:
            raise
        except LabelError as e:
            raise LabelDataError(str(e)) from None
        except OSError as e:  # an annotation that exists but cannot be read (a folder, no permission)
            raise LabelDataError(f"annotation for id '{item_id}' is unreadable: "
                                 f"{self.root / 'Annotations' / (item_id + '.xml')} ({e})") from None

    def check_labels(self, ids: Sequence[str]) -> list[str]:
        self.class_labels  # noqa: B018 - an explicit --cls_labels file that is missing fails once, here
        return super().check_labels(ids)

    def describe(self) -> str:
        return f"{self.name.upper()} {self.root} ({self.num_classes} classes)"


def coco_split_of(stem: str) -> str:
    """``COCO_val2014_000000000042`` -> ``val``; any other name is refused, naming it."""
    try:
        return coco_meta.split_of(stem)
    except ValueError:
        raise DataError(f"id '{stem}' is not a COCO 2014 file stem (COCO_<train|val>2014_<12 digits>)") from None


class CocoSource(DataSource):
    """The COCO 2014 tree of ``tools/prepare_coco.py``: ids are file stems, the ground truth is
    named by the integer image id, and it has no void value (crowd regions are background, §16.1)."""

    allow_truncated = True  # the few truncated train2014 JPEGs (§16.2 train_irn)

    def __init__(self, name: str, classes: Sequence[str], gt_ignore: int | None, root: str | Path,
                 lists: dict[str, str | Path | None] | None = None, eval_set: str = "train",
                 max_images: int | None = None, cls_labels: str | Path | None = None):
        super().__init__(name, classes, gt_ignore, root, lists, eval_set, max_images, cls_labels)
        self._files: dict[str, SplitFiles] = {}

    @property
    def eval_split(self) -> str:
        split = self.eval_set[:-4] if self.eval_set.endswith("2014") else self.eval_set
        if split not in coco_meta.SPLITS:
            raise DataError(f"COCO eval split must be one of {coco_meta.SPLITS} (--chainer_eval_set), "
                            f"got {self.eval_set!r}")
        return split

    def list_path(self, role: str) -> Path:
        if role == "eval":
            return self.root / COCO_LIST_DIR / coco_meta.list_name(self.eval_split)
        return self.lists.get(role) or self.root / COCO_LIST_DIR / coco_meta.list_name(COCO_DEFAULT_SPLITS[role])

    def _read_list(self, role: str) -> list[str]:
        path = self.list_path(role)
        split = self.eval_split if role == "eval" else COCO_DEFAULT_SPLITS[role]
        if path == self.root / COCO_LIST_DIR / coco_meta.list_name(split):
            # The prepared tree's list, read and checked (stems of this split) by datasets/coco.py.
            return list(coco_meta.coco_files(self.root, split, COCO_LIST_DIR, COCO_GT_DIR).ids)
        ids = read_id_list(path)
        for i in ids:
            try:
                coco_split_of(i)
            except DataError as e:
                raise DataError(f"{e}, in {path}") from None
        return ids

    def split_files(self, split: str) -> SplitFiles:
        """``coco_files`` of a split (ids from ``lists/`` when there, else the image folder)."""
        if split not in self._files:
            has_list = (self.root / COCO_LIST_DIR / coco_meta.list_name(split)).is_file()
            self._files[split] = coco_meta.coco_files(self.root, split, COCO_LIST_DIR if has_list else None,
                                                      COCO_GT_DIR)
        return self._files[split]

    def files_of(self, item_id: str) -> SplitFiles:
        return self.split_files(coco_split_of(item_id))

    def labels_file(self, split: str) -> Path:
        return self.cls_labels or self.root / coco_meta.cls_labels_name(split)

    def _table(self, split: str, item_id: str) -> dict[str, list[int]]:
        path = self.labels_file(split)
        key = str(path)
        if key not in self._labels_cache:
            if not path.is_file():
                raise DataError(f"image-level labels for id '{item_id}': class-label file not found: {path} "
                                "(tools/prepare_coco.py writes it)")
            try:
                self._labels_cache[key] = load_cls_labels(path)
            except (LabelError, ValueError) as e:
                raise DataError(f"image-level labels for id '{item_id}': {e}") from None
        return self._labels_cache[key]

    def labels(self, item_id: str) -> list[int]:
        split = coco_split_of(item_id)
        table = self._table(split, item_id)
        if item_id not in table:
            raise DataError(f"image-level labels missing for id '{item_id}': {self.labels_file(split)}")
        found = table[item_id]
        bad = [c for c in found if not 0 <= c < self.num_classes]
        if bad:
            raise DataError(f"image-level labels of id '{item_id}' hold class indices {bad} outside "
                            f"0..{self.num_classes - 1}: {self.labels_file(split)}")
        return sorted(found)

    def describe(self) -> str:
        return f"COCO 2014 {self.root} ({self.num_classes} classes)"


__all__ = ["DataSource", "VOCSource", "CocoSource", "coco_split_of", "ROLES", "SEED_IGNORE", "VOC_IMAGE_DIR",
           "VOC_GT_DIR", "VOC_STATS_GT_DIRS", "DataError", "LabelDataError", "count_note"]

"""First-stage data sets (VOC or COCO through a data source), geometric helpers.

Every data set takes a ``voc12.source.DataSource`` (a plain VOC root path is accepted too and
means a VOC source): ids, image files, image-level labels and the class count come from it, and
images/labels are read through ``datasets/readers.py``. The class names stay ``VOC12*`` after
the reference.

The helpers reproduce the reference's semantics exactly (spec §4.3): PIL resampling
(order 3 = BICUBIC, 0 = NEAREST) of uint8 arrays, numpy round-half-to-even sizes, the
random crop that places small images at a random offset in the canvas, etc.
Randomness comes from a ``numpy.random.Generator`` passed in; datasets create theirs
lazily per process from ``torch.initial_seed()`` so that a seeded DataLoader (see
``misc.torchutils.loader_kwargs``) gives reproducible augmentation.

Ids are strings everywhere (QUIRK-8).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import readers
from datasets.readers import DataError
from datasets.prepare.cls_labels import ClassLabels
from datasets.transforms import (IMAGENET_MEAN, IMAGENET_STD, TorchvisionNormalize, hwc_to_chw, msf_inputs,  # noqa: F401
                                 random_crop, random_crop_box, random_lr_flip, random_resize_long, random_scale,
                                 rescale, resize, top_left_crop)
from voc12.source import SEED_IGNORE, VOC_GT_DIR, VOC_IMAGE_DIR, DataSource, VOCSource, as_source, load_id_list

IMAGE_DIR = VOC_IMAGE_DIR
GT_DIR = VOC_GT_DIR
IGNORE = SEED_IGNORE  # "unknown" in the pipeline's label maps and crop padding


# ----------------------------------------------------------------------------- ids and files


def _as_ids(id_list: str | Path | Sequence[str]) -> list[str]:
    if isinstance(id_list, (str, Path)):
        return load_id_list(id_list)
    return [str(i) for i in id_list]


def image_path(source: DataSource | str | Path, item_id: str) -> Path:
    return as_source(source).image_path(item_id)


def load_image(source: DataSource | str | Path, item_id: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) through the source's reader (COCO tolerates truncated JPEGs)."""
    return as_source(source).read_image(item_id)


def read_rgb(path: str | Path, item_id: str) -> np.ndarray:
    """Thin alias of ``datasets.readers.read_image`` (strict) as a writable uint8 array."""
    return np.array(readers.read_image(Path(path), item_id))


def read_label_png(path: str | Path, item_id: str, what: str = "label") -> np.ndarray:
    """Single-channel PNG as uint8 (H, W), values unchecked; palette PNGs give their raw indices.

    Thin alias of ``datasets.readers.read_label``; the steps read through the data source,
    which checks the values against its class count.
    """
    return np.array(readers.read_label(Path(path), item_id, 256, what, None), dtype=np.uint8)


def check_files(ids: Sequence[str], directory: str | Path, suffix: str, what: str) -> None:
    """Fail early, naming the first missing file, instead of inside a worker later."""
    readers.require_files(list(ids), Path(directory), suffix, what)


# ----------------------------------------------------------------------------- geometric helpers (§4.3)

# ----------------------------------------------------------------------------- datasets (§4.4)


class _RngMixin:
    """A numpy Generator per process, seeded from torch's (per-worker) initial seed."""

    _rng: np.random.Generator | None = None
    _rng_pid: int | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % 2**63)
            self._rng_pid = os.getpid()
        return self._rng


class VOC12ImageDataset(_RngMixin, Dataset):
    """Image pipeline: resize_long → random_scale → normalise → flip → crop → CHW (all optional).

    ``source``: a ``DataSource`` (VOC or COCO) or a VOC root path.
    """

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource | str | Path,
                 resize_long: tuple[int, int] | None = None, rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_size: int | None = None, crop_method: str | None = None, to_torch: bool = True):
        self.ids = _as_ids(id_list)
        self.source = as_source(source)
        self.resize_long = resize_long
        self.rescale = rescale
        self.img_normal = img_normal
        self.hor_flip = hor_flip
        self.crop_size = crop_size
        if crop_size is not None and crop_method not in ("random", "top_left"):
            raise ValueError(f"crop_method must be 'random' or 'top_left' with a crop size, got {crop_method!r}")
        self.crop_method = crop_method
        self.to_torch = to_torch
        self.source.check_images(self.ids)

    @property
    def voc12_root(self) -> Path:
        """The VOC root of a VOC source (former attribute)."""
        return getattr(self.source, "root")

    def __len__(self) -> int:
        return len(self.ids)

    def transform_image(self, img: np.ndarray) -> np.ndarray:
        rng = self.rng
        if self.resize_long:
            img = random_resize_long(img, self.resize_long[0], self.resize_long[1], rng)
        if self.rescale:
            img = random_scale(img, self.rescale, 3, rng)
        if self.img_normal:
            img = self.img_normal(img)
        if self.hor_flip:
            img = random_lr_flip(img, rng)
        if self.crop_size:
            if self.crop_method == "random":
                img = random_crop(img, self.crop_size, 0, rng)
            else:
                img = top_left_crop(img, self.crop_size, 0)
        if self.to_torch:
            img = hwc_to_chw(img)
        return img

    def __getitem__(self, idx: int) -> dict[str, Any]:
        name = self.ids[idx]
        img = self.transform_image(self.source.read_image(name))
        return {"name": name, "img": img}


class _Labels:
    """Image-level labels of a source, or of an explicit ``ClassLabels`` table (former argument)."""

    def __init__(self, source: DataSource, labels: ClassLabels | None):
        self.source = source
        self.table = labels

    def vector(self, item_id: str) -> np.ndarray:
        return self.table.vector(item_id) if self.table is not None else self.source.label_vector(item_id)


class VOC12ClassificationDataset(VOC12ImageDataset):
    """Image dataset + ``label``: float32 multi-hot over the source's ``num_classes`` (VOC 20, COCO 80)."""

    def __init__(self, id_list, source, resize_long=None, rescale=None,
                 img_normal=TorchvisionNormalize(), hor_flip=False, crop_size=None, crop_method=None,
                 to_torch=True, labels: ClassLabels | None = None, cls_labels_file: str | Path | None = None):
        super().__init__(id_list, as_source(source, cls_labels_file), resize_long, rescale, img_normal, hor_flip,
                         crop_size, crop_method, to_torch)
        if labels is None:
            self.source.check_labels(self.ids)
        self.labels = _Labels(self.source, labels)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        out = super().__getitem__(idx)
        out["label"] = torch.from_numpy(self.labels.vector(out["name"]))
        return out


class VOC12ClassificationDatasetMSF(VOC12ClassificationDataset):
    """Multi-scale inference items: ``img`` = list over scales of (2, 3, h_s, w_s) (a single array
    if only one scale), ``size`` = (H, W), ``label``."""

    def __init__(self, id_list, source, img_normal=TorchvisionNormalize(), scales: Sequence[float] = (1.0,),
                 labels: ClassLabels | None = None, cls_labels_file: str | Path | None = None):
        super().__init__(id_list, source, img_normal=img_normal, labels=labels, cls_labels_file=cls_labels_file)
        self.scales = tuple(float(s) for s in scales)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        name = self.ids[idx]
        img = self.source.read_image(name)
        ms = msf_inputs(img, self.scales, self.img_normal)
        return {"name": name, "img": ms[0] if len(ms) == 1 else ms, "size": (img.shape[0], img.shape[1]),
                "label": torch.from_numpy(self.labels.vector(name))}


class VOC12SegmentationDataset(_RngMixin, Dataset):
    """Image + label PNG (``<label_dir>/<id>.png``, values 0..C and 255): random_scale (bicubic /
    nearest) → normalise → joint flip → joint crop (random: fills 0 / 255; top_left) → CHW image,
    (S, S) uint8 label."""

    def __init__(self, id_list: str | Path | Sequence[str], label_dir: str | Path, crop_size: int,
                 source: DataSource | str | Path, rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_method: str = "random"):
        if crop_method not in ("random", "top_left"):
            raise ValueError(f"crop_method must be 'random' or 'top_left', got {crop_method!r}")
        self.ids = _as_ids(id_list)
        self.label_dir = Path(label_dir)
        self.source = as_source(source)
        self.crop_size = crop_size
        self.rescale = rescale
        self.img_normal = img_normal
        self.hor_flip = hor_flip
        self.crop_method = crop_method
        self.source.check_images(self.ids)
        check_files(self.ids, self.label_dir, ".png", "label")

    @property
    def voc12_root(self) -> Path:
        return getattr(self.source, "root")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        name = self.ids[idx]
        img = self.source.read_image(name)
        label = self.source.read_label_map(self.label_dir / f"{name}.png", name)
        if img.shape[:2] != label.shape:
            raise DataError(f"id '{name}': label {self.label_dir / (name + '.png')} is {label.shape} "
                            f"but the image is {img.shape[:2]}")
        rng = self.rng
        if self.rescale:
            img, label = random_scale((img, label), self.rescale, (3, 0), rng)
        if self.img_normal:
            img = self.img_normal(img)
        if self.hor_flip:
            img, label = random_lr_flip((img, label), rng)
        if self.crop_method == "random":
            img, label = random_crop((img, label), self.crop_size, (0, IGNORE), rng)
        else:
            img = top_left_crop(img, self.crop_size, 0)
            label = top_left_crop(label, self.crop_size, IGNORE)
        return {"name": name, "img": hwc_to_chw(img), "label": label}


class VOC12GTDataset(Dataset):
    """Ground-truth maps for evaluation as int64, the void value (VOC 255) → −1 (chainercv's
    convention, §8); COCO's ground truth has no void value. ``gt_dir``: another folder of a VOC
    root instead of SegmentationClass."""

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource | str | Path,
                 gt_dir: str | None = None):
        self.ids = _as_ids(id_list)
        src = as_source(source)
        if gt_dir is not None and gt_dir != GT_DIR:
            if not isinstance(src, VOCSource):
                raise ValueError("gt_dir only applies to a VOC source")
            src = VOCSource(src.root, src.lists, src.eval_set, src.max_images, src.cls_labels, gt_dir=gt_dir)
        self.source = src
        self.source.check_gt(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.source.read_gt(self.ids[idx])


__all__ = [
    "DataError", "load_id_list", "image_path", "load_image", "read_rgb", "read_label_png", "check_files",
    "resize", "rescale", "random_resize_long", "random_scale", "random_lr_flip", "random_crop_box",
    "random_crop", "top_left_crop", "hwc_to_chw", "TorchvisionNormalize", "msf_inputs",
    "VOC12ImageDataset", "VOC12ClassificationDataset", "VOC12ClassificationDatasetMSF",
    "VOC12SegmentationDataset", "VOC12GTDataset", "IGNORE", "IMAGE_DIR", "GT_DIR",
]

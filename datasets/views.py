"""The first stage's views of a registered data set (spec first-stage §4.4, §11.2).

``open_source`` (or ``data_source``, from a run's options) builds the run's ``DataSource`` from
the data set's entry in ``datasets/build.py``; the views read through it (ids, images, image-level
labels, ground truth) and transform with the first stage's array transforms of
``datasets/transforms.py``:

    ImageView           image pipeline (IRN's mean-shift pass)
    ClassificationView  + image-level labels (CAM training and its validation loss)
    InferenceView       multi-scale flipped pairs (make_cam; make_sem_seg at scale 1, no labels)
    SegmentationView    image + a label PNG (the seeds), jointly transformed
    AffinityView        + the seeds' pair labels on the path index (IRN training)
    GroundTruthView     ground truth for evaluation

Randomness comes from a ``numpy.random.Generator`` that each view creates lazily per process
from ``torch.initial_seed()``, so a seeded DataLoader gives reproducible augmentation. Ids are
strings everywhere (QUIRK-8).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.affinity import PathIndex, affinity_labels
from datasets.build import dataset_entry
from datasets.readers import DataError, read_id_list, require_files
from datasets.sources import SEED_IGNORE, DataSource
from datasets.transforms import (TorchvisionNormalize, hwc_to_chw, msf_inputs, random_crop, random_lr_flip,
                                 random_resize_long, random_scale, rescale, top_left_crop)

LABEL_REDUCTION = 0.25  # IRN's affinity labels: stride 4 of its outputs


# ----------------------------------------------------------------------------- the run's source


def open_source(dataset: str, root: str | Path, lists: dict[str, str | Path | None] | None = None,
                eval_set: str = "train", max_images: int | None = None,
                cls_labels: str | Path | None = None) -> DataSource:
    """The first stage's source of a registered data set under ``root``.

    ``lists``: role -> id list (None: the layout's default); ``eval_set``: the split that eval
    reads; ``max_images``: cut train/val/infer to that many ids; ``cls_labels``: a class-label
    file instead of the layout's default.
    """
    entry = dataset_entry(dataset)
    return entry.first_stage(dataset, entry.classes, entry.gt_ignore_index, root, lists, eval_set,
                             max_images, cls_labels)


def data_source(args: Any) -> DataSource:
    """The source of a run's options: ``dataset``, the root option its entry names
    (``voc12_root``, ``coco_root``), ``train_list`` / ``val_list`` / ``infer_list``,
    ``chainer_eval_set``, ``max_images`` and ``cls_labels``."""
    entry = dataset_entry(args.dataset)
    lists = {r: getattr(args, f"{r}_list") for r in ("train", "val", "infer")}
    return open_source(args.dataset, getattr(args, entry.first_stage_root), lists, args.chainer_eval_set,
                       args.max_images, args.cls_labels)


def _as_ids(id_list: str | Path | Sequence[str]) -> list[str]:
    if isinstance(id_list, (str, Path)):
        return read_id_list(id_list)
    return [str(i) for i in id_list]


# ----------------------------------------------------------------------------- views


class _AugmentedView(Dataset):
    """The ids of a source (images checked now), the augmentation settings, and a numpy
    Generator per process seeded from torch's (per-worker) initial seed."""

    _rng: np.random.Generator | None = None
    _rng_pid: int | None = None

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource, rescale: tuple[float, float] | None,
                 img_normal: TorchvisionNormalize | None, hor_flip: bool, crop_size: int | None,
                 crop_method: str | None):
        self.ids = _as_ids(id_list)
        self.source = source
        self.rescale = rescale
        self.img_normal = img_normal
        self.hor_flip = hor_flip
        self.crop_size = crop_size
        self.crop_method = crop_method
        self.source.check_images(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % 2**63)
            self._rng_pid = os.getpid()
        return self._rng


class ImageView(_AugmentedView):
    """Image pipeline: resize_long → random_scale → normalise → flip → crop → CHW (all optional)."""

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource,
                 resize_long: tuple[int, int] | None = None, rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_size: int | None = None, crop_method: str | None = None, to_torch: bool = True):
        if crop_size is not None and crop_method not in ("random", "top_left"):
            raise ValueError(f"crop_method must be 'random' or 'top_left' with a crop size, got {crop_method!r}")
        self.resize_long = resize_long
        self.to_torch = to_torch
        super().__init__(id_list, source, rescale, img_normal, hor_flip, crop_size, crop_method)

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


class ClassificationView(ImageView):
    """Image view + ``label``: float32 multi-hot over the source's ``num_classes`` (VOC 20, COCO 80).

    Every id's labels are read when the view is built, so a bad annotation stops the run first.
    """

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource,
                 resize_long: tuple[int, int] | None = None, rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_size: int | None = None, crop_method: str | None = None, to_torch: bool = True):
        super().__init__(id_list, source, resize_long, rescale, img_normal, hor_flip, crop_size, crop_method,
                         to_torch)
        self.source.check_labels(self.ids)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        out = super().__getitem__(idx)
        out["label"] = torch.from_numpy(self.source.label_vector(out["name"]))
        return out


class InferenceView(Dataset):
    """Multi-scale inference items: ``img`` = list over scales of (2, 3, h_s, w_s) flipped pairs (a
    single array if only one scale), ``size`` = (H, W), and with ``with_labels`` the ``label``
    multi-hot (make_cam; make_sem_seg takes its keys from the CAM files and reads no labels)."""

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(),
                 scales: Sequence[float] = (1.0,), with_labels: bool = True):
        self.ids = _as_ids(id_list)
        self.source = source
        self.img_normal = img_normal
        self.scales = tuple(float(s) for s in scales)
        self.with_labels = with_labels
        self.source.check_images(self.ids)
        if with_labels:
            self.source.check_labels(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        name = self.ids[idx]
        img = self.source.read_image(name)
        ms = msf_inputs(img, self.scales, self.img_normal)
        out = {"name": name, "img": ms[0] if len(ms) == 1 else ms, "size": (img.shape[0], img.shape[1])}
        if self.with_labels:
            out["label"] = torch.from_numpy(self.source.label_vector(name))
        return out


class SegmentationView(_AugmentedView):
    """Image + label PNG (``<label_dir>/<id>.png``, values 0..C and 255): random_scale (bicubic /
    nearest) → normalise → joint flip → joint crop (random: fills 0 / 255; top_left) → CHW image,
    (S, S) uint8 label."""

    def __init__(self, id_list: str | Path | Sequence[str], label_dir: str | Path, crop_size: int,
                 source: DataSource, rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_method: str = "random"):
        if crop_method not in ("random", "top_left"):
            raise ValueError(f"crop_method must be 'random' or 'top_left', got {crop_method!r}")
        super().__init__(id_list, source, rescale, img_normal, hor_flip, crop_size, crop_method)
        self.label_dir = Path(label_dir)
        require_files(self.ids, self.label_dir, ".png", "label")

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
            img, label = random_crop((img, label), self.crop_size, (0, SEED_IGNORE), rng)
        else:
            img = top_left_crop(img, self.crop_size, 0)
            label = top_left_crop(label, self.crop_size, SEED_IGNORE)
        return {"name": name, "img": hwc_to_chw(img), "label": label}


def reduced_size(crop_size: int) -> tuple[int, int]:
    """Size of the reduced label of a crop: numpy-rounded crop/4 (512 → 128)."""
    s = int(np.round(crop_size * LABEL_REDUCTION))
    return s, s


class AffinityView(SegmentationView):
    """Segmentation items + ``aff_bg_pos_label``, ``aff_fg_pos_label``, ``aff_neg_label``.

    The label, jointly scaled/flipped/cropped with the image, is reduced to the stride-4 size
    with PIL nearest (pixel 4i+2 of a 512 crop) and turned into the three pair-label maps of
    the path index: background-positive, foreground-positive and negative pairs, each float32
    (n_dirs, N_src). ``path_index`` fixes the directions; the flattened indices are those of
    the reduced crop. ``num_valid``: label ids below it are known; default the source's label
    count (VOC 21, COCO 81), so 255 (and, for VOC, 21..254) is unknown.
    """

    def __init__(self, id_list: str | Path | Sequence[str], label_dir: str | Path, crop_size: int,
                 source: DataSource, path_index: PathIndex, num_valid: int | None = None,
                 rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_method: str = "random"):
        super().__init__(id_list, label_dir, crop_size, source, rescale=rescale, img_normal=img_normal,
                         hor_flip=hor_flip, crop_method=crop_method)
        self.path_index = path_index
        self.num_valid = self.source.num_labels if num_valid is None else int(num_valid)
        # Raises early (naming the sizes) if the crop is too small for the radius.
        self.indices = path_index.indices(reduced_size(crop_size))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        out = super().__getitem__(idx)
        label = rescale(out["label"], LABEL_REDUCTION, 0)  # PIL nearest: samples 4i+2
        bg_pos, fg_pos, neg = affinity_labels(torch.from_numpy(np.array(label)), self.indices,
                                              self.num_valid)
        out["aff_bg_pos_label"] = bg_pos
        out["aff_fg_pos_label"] = fg_pos
        out["aff_neg_label"] = neg
        return out


class GroundTruthView(Dataset):
    """Ground-truth maps for evaluation as int64, the void value (VOC 255) → −1 (chainercv's
    convention, §8); COCO's ground truth has no void value."""

    def __init__(self, id_list: str | Path | Sequence[str], source: DataSource):
        self.ids = _as_ids(id_list)
        self.source = source
        self.source.check_gt(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.source.read_gt(self.ids[idx])


__all__ = ["open_source", "data_source", "ImageView", "ClassificationView", "InferenceView", "SegmentationView",
           "AffinityView", "GroundTruthView", "reduced_size", "LABEL_REDUCTION"]

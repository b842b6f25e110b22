"""Training and evaluation samples of any registered data set (VOC, COCO), through the
shared readers of ``datasets/readers.py``.

Everything a run will read is checked when the data set is built (directories, list,
one file per id), so a missing file fails in seconds with its id and path instead of
in a worker hours later. Per-image content (sizes, label values, truncated files) is
checked when the image is read.
"""
from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.build import dataset_entry
from datasets.readers import (DataError, SplitFiles, check_sizes, check_void_under_reliable, read_image, read_label,
                              read_mask, require_dir, require_files)
from datasets.transforms import TrainTransform, ValTransform
from utils.config import DataCfg


def align_to_image(item_id: str, image: tuple[Image.Image, Path], policy: str,
                   *others: tuple[Image.Image, Path]) -> list[Image.Image]:
    """Labels and masks of another size than their image, by ``data.mask_size_mismatch``:
    ``error`` (default), ``resize_nearest``, or ``crop_like_reference`` (left as they are,
    so the crop box drawn on the image cuts them as the reference does: QUIRK-S3)."""
    if policy == "error":
        check_sizes(item_id, image, *others)
        return [img for img, _ in others]
    if policy == "resize_nearest":
        size = image[0].size
        return [img if img.size == size else img.resize(size, Image.NEAREST) for img, _ in others]
    return [img for img, _ in others]


class TrainSet(Dataset):
    """Training samples: image, pseudo-label (the target) and confidence mask, jointly transformed."""

    def __init__(self, cfg: DataCfg, split: str | None = None):
        self.cfg = cfg
        entry = dataset_entry(cfg.dataset)
        self.files: SplitFiles = entry.files(cfg, split or entry.train_split(cfg))
        self.files.check(with_gt=False)
        root = Path(cfg.root)
        self.label_dir = require_dir(root / cfg.pseudo_label_dir, "pseudo-label")
        self.mask_dir = require_dir(root / cfg.mask_dir, "confidence mask")
        require_files(self.ids, self.label_dir, ".png", "pseudo-label")
        require_files(self.ids, self.mask_dir, ".png", "confidence mask")
        self.allow_truncated = cfg.truncated_images == "load"
        self.transform = TrainTransform(cfg)

    @property
    def ids(self) -> list[str]:
        return self.files.ids

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, item_id: str) -> tuple[Path, Path, Path]:
        """(image, pseudo-label, confidence mask) of one sample."""
        return self.files.image(item_id), self.label_dir / f"{item_id}.png", self.mask_dir / f"{item_id}.png"

    def load(self, index: int) -> tuple[str, Image.Image, Image.Image, Image.Image]:
        """The raw (untransformed) sample, validated."""
        i = self.ids[index]
        paths = self.paths(i)
        image = read_image(paths[0], i, self.allow_truncated)
        label = read_label(paths[1], i, self.cfg.num_classes, "pseudo-label")
        mask = read_mask(paths[2], i)
        label, mask = align_to_image(i, (image, paths[0]), self.cfg.mask_size_mismatch,
                                     (label, paths[1]), (mask, paths[2]))
        # Checked on every read, so it holds with data.verify: exists too (verify's full read
        # names every such file before training starts).
        check_void_under_reliable(i, label, mask, paths[1], paths[2])
        return i, image, label, mask

    def __getitem__(self, index: int) -> dict:
        i, image, label, mask = self.load(index)
        image_t, label_t, mask_t = self.transform(image, label, mask, random)
        return {"id": i, "image": image_t, "label": label_t, "mask": mask_t}


class EvalSet(Dataset):
    """Validation / test samples resized to ``val_size``; ``label`` is absent without ground truth.

    ``size`` is the original (height, width), for evaluation at full resolution. ``ids``
    restricts the split to a subset (``train.val_subset``), in the given order.
    """

    def __init__(self, cfg: DataCfg, split: str, with_labels: bool = True, ids: list[str] | None = None,
                 full_labels: bool = False):
        self.cfg = cfg
        self.full_labels = full_labels and with_labels
        self.entry = dataset_entry(cfg.dataset)
        files = self.entry.files(cfg, split)
        if ids is not None:
            unknown = sorted(set(ids) - set(files.ids))
            if unknown:
                raise DataError(f"id '{unknown[0]}' is not in the '{split}' split")
            files = files.subset(list(ids))
        self.files = files
        self.with_labels = with_labels
        files.check(with_gt=with_labels)
        self.allow_truncated = cfg.truncated_images == "load"
        self.transform = ValTransform(cfg)

    @property
    def ids(self) -> list[str]:
        return self.files.ids

    def __len__(self) -> int:
        return len(self.ids)

    def read_gt(self, item_id: str) -> Image.Image:
        return read_label(self.files.gt(item_id), item_id, self.cfg.num_classes, "ground truth",
                          self.entry.gt_ignore_index)

    def __getitem__(self, index: int) -> dict:
        i = self.ids[index]
        image_path = self.files.image(i)
        image = read_image(image_path, i, self.allow_truncated)
        label = None
        if self.with_labels:
            label = self.read_gt(i)
            check_sizes(i, (image, image_path), (label, self.files.gt(i)))
        image_t, label_t = self.transform(image, label)
        item = {"id": i, "image": image_t, "size": torch.tensor([image.height, image.width])}
        if label_t is not None:
            item["label"] = label_t
        if self.full_labels:  # for metrics at the original resolution (sizes differ: see collate_eval)
            item["full_label"] = torch.from_numpy(np.asarray(label, dtype=np.int64).copy())
        return item


def collate_eval(items: list[dict]) -> dict:
    """Default collation, except ``full_label`` (one size per image) stays a list."""
    from torch.utils.data import default_collate
    full = [item.pop("full_label") for item in items] if items and "full_label" in items[0] else None
    batch = default_collate(items)
    if full is not None:
        batch["full_label"] = full
    return batch


def val_subset_ids(ids: list[str], size: int | None, seed: int) -> list[str]:
    """A fixed, seeded subset of ``size`` ids (all with None), in the split's order: the same
    images every epoch and on every machine, as COCO users validate on a few thousand."""
    if size is None or size >= len(ids):
        return list(ids)
    picked = np.random.default_rng(seed).choice(len(ids), size=size, replace=False)
    return [ids[k] for k in sorted(picked.tolist())]


def loader_worker_init(worker_id: int) -> None:
    """worker_init_fn of every loader: SIGTERM is the main process's to handle. torchrun,
    ``kill -TERM -<pgid>`` and SLURM's ``--signal`` reach every process of the job, and a
    worker that died of it made the main process fail with "DataLoader worker ... killed by
    signal" instead of saving its checkpoint and exiting with 143. The main process shuts its
    workers down itself when it stops."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_worker_fn(seed: int, rank: int, num_workers: int):
    """worker_init_fn seeding numpy and ``random`` with num_workers*rank + worker_id + seed (spec §2),
    SIGTERM left to the main process (``loader_worker_init``)."""
    def init(worker_id: int) -> None:
        loader_worker_init(worker_id)
        s = num_workers * rank + worker_id + seed
        np.random.seed(s)
        random.seed(s)
    return init


__all__ = ["TrainSet", "EvalSet", "collate_eval", "val_subset_ids", "seed_worker_fn", "loader_worker_init",
           "DataError"]

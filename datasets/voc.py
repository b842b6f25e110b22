"""PASCAL VOC-format segmentation data: split lists, training and validation samples.

Everything a run will read is checked when the dataset is built (directories,
list, one file per id), so a missing file fails in seconds with its id and path
instead of in a worker hours later. Per-image content (sizes, label values,
truncated files) is checked when the image is read.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from datasets.transforms import TrainTransform, ValTransform
from utils.config import DataCfg
from utils.voc import IGNORE_INDEX


class DataError(ValueError):
    """Bad or missing input data; the message names the id and the file."""


def read_split(list_dir: str | Path, split: str) -> list[str]:
    """Ids of ``<list_dir>/<split>.txt``, one per line, kept as strings (first-stage QUIRK-8)."""
    path = Path(list_dir) / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"split list not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list is empty: {path}")
    return ids


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path}")
    return path


def _require_files(ids: list[str], directory: Path, suffix: str, what: str) -> None:
    missing = [i for i in ids if not (directory / f"{i}{suffix}").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{what} missing for id '{missing[0]}': {directory / (missing[0] + suffix)}{more}")


def _open(path: Path, item_id: str, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file raises here, not inside a transform
    except FileNotFoundError:
        raise DataError(f"{what} missing for id '{item_id}': {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(f"{what} for id '{item_id}' is unreadable or truncated: {path} ({e})") from None
    return img


def read_image(path: Path, item_id: str) -> Image.Image:
    return _open(path, item_id, "image").convert("RGB")


def read_label(path: Path, item_id: str, num_classes: int, what: str = "label") -> Image.Image:
    """A single-channel label map; palette indices are read raw, never through the palette."""
    img = _open(path, item_id, what)
    if img.mode not in ("L", "P"):
        raise DataError(f"{what} for id '{item_id}' must be a single-channel (L or P) PNG, "
                        f"got mode {img.mode}: {path}")
    arr = np.asarray(img)
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(np.unique(arr[bad]).tolist()))[:10]
        raise DataError(f"{what} for id '{item_id}' has values {values} outside 0..{num_classes - 1} "
                        f"and {IGNORE_INDEX}: {path}")
    return Image.fromarray(arr, mode="L")


def read_mask(path: Path, item_id: str) -> Image.Image:
    """Confidence mask as an L image of 0/1: any non-zero pixel is reliable (spec §1).

    Accepts the first stage's RGB 0/255 files and single-channel 0/1 or 0/255 ones.
    """
    img = _open(path, item_id, "confidence mask")
    arr = np.asarray(img)  # P mode: raw indices
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return Image.fromarray((arr > 0).astype(np.uint8), mode="L")


def _check_sizes(item_id: str, reference: tuple[Image.Image, Path], *others: tuple[Image.Image, Path]) -> None:
    ref, ref_path = reference
    for img, path in others:
        if img.size != ref.size:
            raise DataError(f"id '{item_id}': {path} is {img.width}x{img.height} but {ref_path} "
                            f"is {ref.width}x{ref.height} (width x height)")


class VOCTrainSet(Dataset):
    """Training samples: image, pseudo-label (the target) and confidence mask, jointly transformed."""

    def __init__(self, cfg: DataCfg, split: str | None = None):
        self.cfg = cfg
        root = Path(cfg.root)
        self.image_dir = _require_dir(root / cfg.image_dir, "image")
        self.label_dir = _require_dir(root / cfg.pseudo_label_dir, "pseudo-label")
        self.mask_dir = _require_dir(root / cfg.mask_dir, "confidence mask")
        list_dir = _require_dir(root / cfg.list_dir, "split list")
        self.ids = read_split(list_dir, split or ("train_aug" if cfg.aug else "train"))
        _require_files(self.ids, self.image_dir, ".jpg", "image")
        _require_files(self.ids, self.label_dir, ".png", "pseudo-label")
        _require_files(self.ids, self.mask_dir, ".png", "confidence mask")
        self.transform = TrainTransform(cfg)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[str, Image.Image, Image.Image, Image.Image]:
        """The raw (untransformed) sample, validated."""
        i = self.ids[index]
        paths = (self.image_dir / f"{i}.jpg", self.label_dir / f"{i}.png", self.mask_dir / f"{i}.png")
        image = read_image(paths[0], i)
        label = read_label(paths[1], i, self.cfg.num_classes, "pseudo-label")
        mask = read_mask(paths[2], i)
        _check_sizes(i, (image, paths[0]), (label, paths[1]), (mask, paths[2]))
        return i, image, label, mask

    def __getitem__(self, index: int) -> dict:
        i, image, label, mask = self.load(index)
        image_t, label_t, mask_t = self.transform(image, label, mask, random)
        return {"id": i, "image": image_t, "label": label_t, "mask": mask_t}


class VOCEvalSet(Dataset):
    """Validation / test samples resized to ``val_size``; ``label`` is absent without ground truth.

    ``size`` is the original (height, width), for evaluation at full resolution.
    """

    def __init__(self, cfg: DataCfg, split: str, with_labels: bool = True):
        self.cfg = cfg
        root = Path(cfg.root)
        self.image_dir = _require_dir(root / cfg.image_dir, "image")
        list_dir = _require_dir(root / cfg.list_dir, "split list")
        self.ids = read_split(list_dir, split)
        _require_files(self.ids, self.image_dir, ".jpg", "image")
        self.gt_dir = None
        if with_labels:
            self.gt_dir = _require_dir(root / cfg.gt_dir, "ground-truth")
            _require_files(self.ids, self.gt_dir, ".png", "ground truth")
        self.transform = ValTransform(cfg)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        i = self.ids[index]
        image_path = self.image_dir / f"{i}.jpg"
        image = read_image(image_path, i)
        label = None
        if self.gt_dir is not None:
            label_path = self.gt_dir / f"{i}.png"
            label = read_label(label_path, i, self.cfg.num_classes, "ground truth")
            _check_sizes(i, (image, image_path), (label, label_path))
        image_t, label_t = self.transform(image, label)
        item = {"id": i, "image": image_t, "size": torch.tensor([image.height, image.width])}
        if label_t is not None:
            item["label"] = label_t
        return item


def seed_worker_fn(seed: int, rank: int, num_workers: int):
    """worker_init_fn seeding numpy and ``random`` with num_workers*rank + worker_id + seed (spec §2)."""
    def init(worker_id: int) -> None:
        s = num_workers * rank + worker_id + seed
        np.random.seed(s)
        random.seed(s)
    return init

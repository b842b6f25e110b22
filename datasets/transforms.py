"""Joint image / pseudo-label / confidence-mask transforms (spec second-stage §2).

Images, labels and masks travel as PIL images until the end so geometric ops use
PIL's resamplers, as the reference does: bilinear for the image, nearest for
label and mask (nearest never invents a label value).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from utils.config import DataCfg
from utils.voc import IGNORE_INDEX


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], attempts: int,
                            rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn by torchvision's RandomResizedCrop rule.

    Area uniform in ``scale`` times the image area, aspect ratio log-uniform in
    ``ratio``; after ``attempts`` misses a centred crop with the ratio clamped
    into range (or the whole image).
    """
    rng = rng or random
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class TrainTransform:
    """Random resized crop (or scale jitter + crop), flip, to tensor, normalise."""

    cfg: DataCfg

    def __call__(self, image: Image.Image, label: Image.Image, mask: Image.Image,
                 rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = rng or random
        size = self.cfg.crop_size
        if self.cfg.scale_mode == "rrc":
            # QUIRK (spec §2): only scale[0:2] is read, as an area range.
            top, left, h, w = random_resized_crop_box(
                image.height, image.width, (self.cfg.scale[0], self.cfg.scale[1]),
                (self.cfg.ratio[0], self.cfg.ratio[1]), self.cfg.crop_attempts, rng)
            # Crop, then resize, as torchvision's resized_crop does on PIL images.
            box = (left, top, left + w, top + h)
            image = image.crop(box).resize((size, size), Image.BILINEAR)
            label = label.crop(box).resize((size, size), Image.NEAREST)
            mask = mask.crop(box).resize((size, size), Image.NEAREST)
        else:
            image, label, mask = self._jitter_and_crop(image, label, mask, rng)
        if rng.random() < self.cfg.flip_prob:
            image, label, mask = (x.transpose(Image.FLIP_LEFT_RIGHT) for x in (image, label, mask))
        return (to_normalized_tensor(image, self.cfg.mean, self.cfg.std),
                torch.from_numpy(np.asarray(label, dtype=np.int64).copy()),
                torch.from_numpy(np.asarray(mask, dtype=np.int64).copy()))

    def _jitter_and_crop(self, image, label, mask, rng):
        """DeepLab-style: rescale by a factor from the list, pad, random crop."""
        s = rng.choice(self.cfg.scale)
        w, h = max(1, round(image.width * s)), max(1, round(image.height * s))
        image = image.resize((w, h), Image.BILINEAR)
        label, mask = label.resize((w, h), Image.NEAREST), mask.resize((w, h), Image.NEAREST)
        size = self.cfg.crop_size
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        if pad_w or pad_h:
            # Pad the image with the mean colour so it normalises to 0; the padded
            # label is ignored and the padded mask unreliable.
            fill = tuple(int(round(m * 255)) for m in self.cfg.mean)
            image = _pad(image, pad_w, pad_h, fill)
            label = _pad(label, pad_w, pad_h, IGNORE_INDEX)
            mask = _pad(mask, pad_w, pad_h, 0)
        top = rng.randint(0, image.height - size)
        left = rng.randint(0, image.width - size)
        box = (left, top, left + size, top + size)
        return image.crop(box), label.crop(box), mask.crop(box)


def _pad(img: Image.Image, pad_w: int, pad_h: int, fill) -> Image.Image:
    out = Image.new(img.mode, (img.width + pad_w, img.height + pad_h), fill)
    out.paste(img, (0, 0))
    return out


@dataclass
class ValTransform:
    """Resize image (bilinear) and label (nearest) to a square, normalise (spec §2 QUIRK)."""

    cfg: DataCfg

    def __call__(self, image: Image.Image, label: Image.Image | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = (self.cfg.val_size, self.cfg.val_size)
        out = to_normalized_tensor(image.resize(size, Image.BILINEAR), self.cfg.mean, self.cfg.std)
        if label is None:
            return out, None
        return out, torch.from_numpy(np.asarray(label.resize(size, Image.NEAREST), dtype=np.int64).copy())


def to_normalized_tensor(image: Image.Image, mean: list[float], std: list[float]) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), mean, std)

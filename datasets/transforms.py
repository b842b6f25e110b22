"""The transforms of both stages.

Second stage (spec second-stage §2): joint image / pseudo-label / confidence-mask
transforms. Images, labels and masks travel as PIL images until the end so geometric ops
use PIL's resamplers, as the reference does: bilinear for the image, nearest for label and
mask (nearest never invents a label value). Randomness from Python's ``random``.

First stage (spec first-stage §4.3, the section at the end): numpy arrays, resampled
through PIL (order 3 = BICUBIC, 0 = NEAREST), numpy round-half-to-even sizes, the random
crop that places small images at a random offset of the canvas, normalisation before flip
and crop. Randomness from a ``numpy.random.Generator`` in a fixed order of draws. They are
variants of the second stage's operations, not the same arithmetic (other resamplers,
RNG, draw order and padding), so each stage keeps its own and neither changes.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

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


# ----------------------------------------------------------------------------- first stage (IRN)
# Counterparts above, and why they are not shared: the image resampler (bicubic here,
# bilinear above), the flip draw (numpy integers(0, 2) vs random() < flip_prob), the crop
# (a random canvas offset for small images, drawn width first, vs pad bottom-right and
# randint), the normalisation (numpy HWC before the crop, the padding then 0, vs a CHW
# tensor at the end).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PIL_ORDER = {3: Image.BICUBIC, 0: Image.NEAREST}


def resize(img: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """PIL resize of a uint8 array to (h, w); order 3 = bicubic, 0 = nearest; no-op if same size."""
    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    if order not in _PIL_ORDER:
        raise ValueError(f"resize order must be 3 (bicubic) or 0 (nearest), got {order}")
    if img.dtype != np.uint8:
        raise TypeError(f"resize expects uint8 arrays (PIL), got {img.dtype}")
    return np.asarray(Image.fromarray(img).resize((w, h), resample=_PIL_ORDER[order]))


def rescale(img: np.ndarray, scale: float, order: int) -> np.ndarray:
    """Resize by ``scale`` with numpy's round-half-to-even sizes (187.5 -> 188, 562.5 -> 562)."""
    h, w = img.shape[:2]
    return resize(img, (int(np.round(h * scale)), int(np.round(w * scale))), order)


def random_resize_long(img: np.ndarray, min_long: int, max_long: int, rng: np.random.Generator) -> np.ndarray:
    """Bicubic rescale so the long side becomes L ~ U{min_long..max_long}; square images use W."""
    target = int(rng.integers(min_long, max_long + 1))
    h, w = img.shape[:2]
    scale = target / h if w < h else target / w
    return rescale(img, scale, 3)


def random_scale(arrays: np.ndarray | tuple[np.ndarray, ...], scale_range: tuple[float, float],
                 orders: int | tuple[int, ...], rng: np.random.Generator):
    """One s = lo + U[0,1)·(hi − lo) for all arrays, each rescaled with its own order.

    (QUIRK-9 fixed: the single-array form rescales the array itself.)
    """
    s = scale_range[0] + rng.random() * (scale_range[1] - scale_range[0])
    if isinstance(arrays, tuple):
        orders = orders if isinstance(orders, tuple) else (orders,) * len(arrays)
        return tuple(rescale(a, s, o) for a, o in zip(arrays, orders))
    return rescale(arrays, s, orders if isinstance(orders, int) else orders[0])


def random_lr_flip(arrays: np.ndarray | tuple[np.ndarray, ...], rng: np.random.Generator):
    """Horizontal flip with probability 1/2, one decision shared by all arrays of a tuple."""
    flip = bool(rng.integers(0, 2))
    if isinstance(arrays, tuple):
        return tuple(np.ascontiguousarray(np.fliplr(a)) if flip else a for a in arrays)
    return np.ascontiguousarray(np.fliplr(arrays)) if flip else arrays


def random_crop_box(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int, int, int, int, int]:
    """(cont_top, cont_bottom, cont_left, cont_right, img_top, img_bottom, img_left, img_right).

    Per axis: an input longer than ``size`` gets a random image offset and container offset 0;
    otherwise the image offset is 0 and the container offset is random, so a small image lands
    at a random place of the canvas.
    """
    def axis(n: int) -> tuple[int, int, int]:
        if n > size:
            return 0, int(rng.integers(0, n - size + 1)), size
        return int(rng.integers(0, size - n + 1)), 0, n
    cl, il, cw = axis(w)  # horizontal first, as the reference draws them
    ct, it, ch = axis(h)
    return ct, ct + ch, cl, cl + cw, it, it + ch, il, il + cw


def random_crop(arrays: np.ndarray | tuple[np.ndarray, ...], size: int, fills: float | tuple[float, ...],
                rng: np.random.Generator):
    """Crop/pad to ``size``×``size`` with one shared box; each array padded with its fill value."""
    single = not isinstance(arrays, tuple)
    arrs = (arrays,) if single else arrays
    fill_t = fills if isinstance(fills, tuple) else (fills,) * len(arrs)
    h, w = arrs[0].shape[:2]
    ct, cb, cl, cr, it, ib, il, ir = random_crop_box(h, w, size, rng)
    out = []
    for a, f in zip(arrs, fill_t):
        canvas = np.full((size, size) + a.shape[2:], f, dtype=a.dtype)
        canvas[ct:cb, cl:cr] = a[it:ib, il:ir]
        out.append(canvas)
    return out[0] if single else tuple(out)


def top_left_crop(img: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``size``×``size`` canvas of ``fill`` with ``img[:size, :size]`` in its top-left corner."""
    h, w = img.shape[:2]
    canvas = np.full((size, size) + img.shape[2:], fill, dtype=img.dtype)
    ch, cw = min(size, h), min(size, w)
    canvas[:ch, :cw] = img[:ch, :cw]
    return canvas


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(img, (2, 0, 1)))


class TorchvisionNormalize:
    """(v/255 − mean)/std per RGB channel, float32 (applied before flip and crop, §4.2)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = np.asarray(img, dtype=np.float32) / 255.0
        return ((x - self.mean) / self.std).astype(np.float32)


def msf_inputs(img: np.ndarray, scales: Sequence[float],
               img_normal: TorchvisionNormalize | None = TorchvisionNormalize()) -> list[np.ndarray]:
    """Per scale the pair [img_s, fliplr(img_s)] as float32 (2, 3, h_s, w_s); scale 1 keeps the original."""
    out = []
    for s in scales:
        x = img if s == 1.0 else rescale(img, s, 3)
        x = img_normal(x) if img_normal else x.astype(np.float32)
        x = hwc_to_chw(x)
        out.append(np.stack([x, np.ascontiguousarray(np.flip(x, -1))], axis=0))
    return out

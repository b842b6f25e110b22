"""Strong augmentation of the mixed batch (spec second-stage §4.3), batched on the device.

The reference runs albumentations per image on the CPU:
``Compose([Compose([RandomBrightnessContrast, HueSaturationValue], p=0.8),
ToGray(p=0.2), GaussianBlur(5, p=0.5)])`` on uint8 images. We do the same
steps for the whole batch at once with per-image random draws, on float 0..255
images, and reproduce OpenCV's uint8 HSV arithmetic so the colour step agrees
with it to a level or so.

QUIRK (not reproduced): the reference converts the RGB tensor "BGR2RGB" before
the augmentation and "RGB2BGR" after it, i.e. it swaps R and B around the
albumentations call. The swap cancels for everything except the hue step, which
therefore rotates the hue of a channel-swapped image. We run every step on the
true RGB image.
"""
from __future__ import annotations

import functools
import sys
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from utils.config import StrongAugCfg

# Constants of the colour spaces / OpenCV, not tunables (the tunables are in StrongAugCfg).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, OpenCV's RGB2GRAY
_HUE_RANGE = 180                        # OpenCV's uint8 hue scale: degrees / 2
_HSV_SHIFT = 12                         # fixed-point bits of OpenCV's uint8 RGB2HSV
# cv2.getGaussianKernel(k, sigma<=0) uses these fixed tables for odd k <= 7 instead
# of sampling a Gaussian with sigma = 0.3((k-1)/2 - 1) + 0.8; albumentations'
# GaussianBlur calls OpenCV with sigma 0, so the reference blurs with these.
_OPENCV_SMALL_GAUSSIAN = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}
# HSV -> RGB: per sector, which of (v, p, q, t) is R, G, B (OpenCV's sector table).
_SECTOR_R = (0, 2, 1, 1, 3, 0)
_SECTOR_G = (3, 0, 0, 2, 1, 1)
_SECTOR_B = (1, 1, 3, 0, 0, 2)


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(values: Sequence[float], like: Tensor, shape: tuple[int, ...] = (1, -1, 1, 1),
              dtype: torch.dtype | None = None) -> Tensor:
    """``values`` as a tensor on ``like``'s device (in its dtype unless ``dtype``), made once per
    (values, device, dtype, shape) and reused: building it anew is a blocking host-to-device
    copy on a GPU, which waits for all queued work, several times per training step."""
    key = (tuple(float(v) for v in values), like.device, dtype or like.dtype, shape)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(key[0], dtype=key[2], device=key[1]).view(shape)
    return _CONSTANTS[key]


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised RGB images (B,3,H,W) back to 0..255."""
    return (images * _constant(std, images)).add_(_constant(mean, images)).mul_(255.0)  # (x·s + m)·255


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """0..255 RGB images (B,3,H,W) to the network's normalised input."""
    return (images / 255.0).sub_(_constant(mean, images)).div_(_constant(std, images))  # (x/255 − m)/s


def rgb_to_hsv_u8(rgb: Tensor) -> Tensor:
    """OpenCV's uint8 RGB2HSV on integer-valued RGB (B,3,H,W) -> int32 HSV (B,3,H,W).

    Same fixed-point arithmetic as cv2.cvtColor(COLOR_RGB2HSV) on uint8 (tables
    of rounded reciprocals, 12 fractional bits), so the result is bit-exact for
    integer inputs: H in 0..179, S and V in 0..255.
    """
    x = rgb.round().clamp(0, 255).to(torch.int32)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.minimum(torch.minimum(r, g), b)
    diff = v - vmin
    i = torch.arange(256, device=rgb.device, dtype=torch.float64)
    one = 1 << _HSV_SHIFT
    # Rounded reciprocal tables; entry 0 is 0 as in OpenCV (a grey pixel has S = H = 0).
    sdiv = torch.where(i > 0, torch.round((255 * one) / i.clamp(min=1)), 0).to(torch.int32)
    hdiv = torch.where(i > 0, torch.round((_HUE_RANGE * one) / (6 * i.clamp(min=1))), 0).to(torch.int32)
    half = one >> 1
    # OpenCV's fixed point: an arithmetic right shift, which floors as OpenCV's does (also for
    # the negative hue sums), and is far cheaper than a floor division.
    s = (diff * sdiv[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + _HUE_RANGE, h)
    return torch.stack([h, s, v], 1)


def _fnmadd(a: Tensor, b: Tensor) -> Tensor:
    """float32 ``1 - a·b`` with a single rounding, like an FMA (a float32 product is exact in float64)."""
    return (1.0 - a.double() * b.double()).float()


def hsv_u8_to_rgb(hsv: Tensor) -> Tensor:
    """OpenCV's uint8 HSV2RGB: integer-valued HSV (B,3,H,W) -> integer-valued float RGB 0..255.

    Mirrors the vectorised path of OpenCV's HSV2RGB_b, which converts all but
    the last few pixels of every image row: float32 arithmetic on S/255 and
    V/255 (sector, fraction, the v/p/q/t table), then ×255 and truncation. (Its
    scalar tail rounds instead of truncating; on wide images it is a handful of
    pixels per row, so we follow the bulk.) OpenCV's x86 wheels compile
    ``1 - s·h`` and ``1 - s·(1 - h)`` into fused multiply-adds (one rounding);
    we emulate that by forming them in float64 and rounding once to float32,
    which makes the result bit-exact with cv2 on all 180×256×256 HSV values
    (plain float32 differs by one level on ~0.005 % of them).
    """
    f32 = dict(dtype=torch.float32, device=hsv.device)
    inv255 = torch.tensor(1.0 / 255.0, **f32)
    one = torch.tensor(1.0, **f32)
    hscale = torch.tensor(6.0, **f32) / _HUE_RANGE
    h = hsv[:, 0].float() * hscale
    s = hsv[:, 1].float() * inv255
    v = hsv[:, 2].float() * inv255
    sector = torch.trunc(h)
    frac = h - sector
    sector = torch.remainder(sector, 6).long()  # OpenCV wraps hues >= 180; ours are < 180 anyway
    tab = torch.stack([v, v * (one - s), v * _fnmadd(s, frac), v * _fnmadd(s, one - frac)], 1)
    lut = torch.tensor([_SECTOR_R, _SECTOR_G, _SECTOR_B], device=hsv.device)  # (3, 6)
    idx = lut[:, sector].transpose(0, 1)  # (B,3,H,W): which tab entry feeds R, G, B
    rgb = torch.gather(tab, 1, idx) * torch.tensor(255.0, **f32)
    return torch.trunc(rgb).clamp(0, 255)


_HSV_TABLES: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _hsv_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """Lookup tables of the two conversions above, built once per device from them (so
    bit-exact by construction): RGB -> packed ``H<<16 | S<<8 | V`` over all 2^24 colours,
    and HSV -> packed ``R | G<<8 | B<<16`` over 180·2^16 triplets; int32, 114 MB together.
    One gather per pixel replaces some forty elementwise passes of the arithmetic."""
    if device in _HSV_TABLES:
        return _HSV_TABLES[device]
    if sys.byteorder != "little":
        raise RuntimeError("the strong augmentation's colour tables unpack bytes little-endian")
    i32 = dict(dtype=torch.int32, device=device)
    low = torch.arange(1 << 16, **i32)
    hi_bits, lo_bits = (low >> 8).expand(16, -1), (low & 255).expand(16, -1)
    rgb2hsv = torch.empty(1 << 24, **i32)
    for r in range(0, 256, 16):  # 16 red levels (1 M colours) at a time bounds the build's memory
        red = torch.arange(r, r + 16, **i32).view(-1, 1).expand(-1, 1 << 16)
        hsv = rgb_to_hsv_u8(torch.stack([red, hi_bits, lo_bits])[None].float())[0]
        rgb2hsv[r << 16:(r + 16) << 16] = ((hsv[0] << 16) | (hsv[1] << 8) | hsv[2]).flatten()
    hsv2rgb = torch.empty(_HUE_RANGE << 16, **i32)
    for h in range(0, _HUE_RANGE, 20):
        hue = torch.arange(h, h + 20, **i32).view(-1, 1).expand(-1, 1 << 16)
        rgb = hsv_u8_to_rgb(torch.stack([hue, hi_bits[:1].expand(20, -1), lo_bits[:1].expand(20, -1)])[None])[0].int()
        hsv2rgb[h << 16:(h + 20) << 16] = (rgb[0] | (rgb[1] << 8) | (rgb[2] << 16)).flatten()
    _HSV_TABLES[device] = rgb2hsv, hsv2rgb
    return rgb2hsv, hsv2rgb


def shift_hsv(images: Tensor, hue: Tensor, sat: Tensor, val: Tensor) -> Tensor:
    """albumentations' uint8 HueSaturationValue with per-image shifts (B,).

    The image enters as uint8 (the reference's LUT chain truncates, so floor);
    hue wraps modulo 180 and saturation/value clip to 0..255, each truncated to
    an integer like the reference's LUTs (``astype(uint8)`` of the float sum).
    The arithmetic is ``rgb_to_hsv_u8``, the shifts, then ``hsv_u8_to_rgb``; it runs
    as lookups: the two conversions from their tables, the shifts from per-image
    tables over the 256 levels (the same float ops on the same values).
    """
    rgb2hsv, hsv2rgb = _hsv_tables(images.device)
    b, _, height, width = images.shape
    x = images.clamp(0, 255).floor_()
    # R·2^16 + G·2^8 + B of integers is below 2^24, so exact in float32.
    key = (x[:, 0] * 65536).add_(x[:, 1], alpha=256).add_(x[:, 2]).long()
    hsv = torch.take(rgb2hsv, key).view(b, -1).long()
    levels = torch.arange(256, dtype=torch.float32, device=images.device)
    hue, sat, val = (t.view(-1, 1).float() for t in (hue, sat, val))
    h = torch.remainder(levels + hue, _HUE_RANGE).floor()
    h = torch.where(h >= _HUE_RANGE, h - _HUE_RANGE, h)  # float rounding of a tiny negative sum
    s = (levels + sat).clamp(0, 255).floor()
    v = (levels + val).clamp(0, 255).floor()
    # Per image: (H, S) -> H'<<16 | S'<<8, indexed by H·256 + S = hsv >> 8; and V -> V'.
    hs_table = ((h.long() << 16)[:, :, None] | (s.long() << 8)[:, None, :]).view(b, -1)
    shifted = hs_table.gather(1, hsv >> 8) | v.long().gather(1, hsv & 255)
    rgb = torch.take(hsv2rgb, shifted)
    out = torch.empty(b, 3, height, width, dtype=torch.float32, device=images.device)
    return out.copy_(rgb.view(torch.uint8).view(b, height, width, 4)[..., :3].permute(0, 3, 1, 2))


def to_gray(images: Tensor) -> Tensor:
    """RGB -> grey with OpenCV's weights, replicated to 3 channels."""
    return (images * _constant(_GRAY_WEIGHTS, images)).sum(1, keepdim=True).expand_as(images)


def gaussian_kernel1d(ksize: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """cv2.getGaussianKernel(ksize, 0): the fixed table for odd ksize <= 7, else OpenCV's sigma rule."""
    if ksize % 2 != 1 or ksize < 1:
        raise ValueError(f"Gaussian kernel size must be odd and positive, got {ksize}")
    if ksize in _OPENCV_SMALL_GAUSSIAN:
        return torch.tensor(_OPENCV_SMALL_GAUSSIAN[ksize], device=device, dtype=dtype)
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = torch.arange(ksize, device=device, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (k / k.sum()).to(dtype)


def _separable(x: Tensor, weights: Tensor, dim: int) -> Tensor:
    """``x`` filtered along ``dim`` (-1 or -2) with per-image taps ``weights`` (B, K), K odd,
    reflect-101 border: K shifted multiply-adds, accumulated in place (``addcmul_``, one
    rounding per tap where the hardware fuses), each a cheap elementwise op on any device
    (a one-channel conv2d is far slower on the CPU)."""
    k = weights.shape[1]
    p = k // 2
    n = x.shape[dim]
    pad = (p, p, 0, 0) if dim == -1 else (0, 0, p, p)
    padded = F.pad(x, pad, mode="reflect")
    w = weights.view(-1, k, *([1] * (x.dim() - 1)))
    out = padded.narrow(dim, 0, n) * w[:, 0]
    for j in range(1, k):
        out.addcmul_(padded.narrow(dim, j, n), w[:, j])
    return out


def blur_batch(images: Tensor, weights: Tensor) -> Tensor:
    """Per-image separable blur of (B, C, H, W) with 1-D taps ``weights`` (B, K): rows, then columns.
    An image whose taps are the identity (1 in the middle) comes out unchanged, bit for bit."""
    return _separable(_separable(images, weights, -1), weights, -2)


def gaussian_blur(images: Tensor, ksize: int) -> Tensor:
    """Separable Gaussian blur with OpenCV's default kernel and border (reflect-101 = torch 'reflect')."""
    k = gaussian_kernel1d(ksize, images.device, images.dtype)
    return blur_batch(images, k.expand(images.shape[0], ksize))


@functools.lru_cache(maxsize=None)
def _tap_rows(kernels: tuple[int, ...]) -> tuple[float, ...]:
    """``blur_taps``' table, flattened: one row per kernel, centred in the largest one's width,
    then the identity row."""
    width = max(kernels)
    rows: list[float] = []
    for k in kernels:
        off = (width - k) // 2
        rows += [0.0] * off + gaussian_kernel1d(k, dtype=torch.float64).tolist() + [0.0] * (width - k - off)
    return tuple(rows + [1.0 if j == width // 2 else 0.0 for j in range(width)])


def blur_taps(kernels: Sequence[int], pick: Tensor, do_blur: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, K) taps: image i gets kernel ``kernels[pick[i]]`` if ``do_blur[i]``, else the identity,
    every kernel centred in the largest one's width, so one pass blurs the whole batch."""
    kernels = tuple(int(k) for k in kernels)
    table = _constant(_tap_rows(kernels), pick, (len(kernels) + 1, max(kernels)), dtype)
    row = torch.where(do_blur, pick, torch.full_like(pick, len(kernels)))
    return table[row]


def _uniform(u: Tensor, bounds: Sequence[float]) -> Tensor:
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo + (hi - lo) * u


class _Draws(NamedTuple):
    """Every image's random choices of one ``strong_augment`` call, each (B,) or (B,1,1,1)."""
    do_color: Tensor
    contrast: Tensor
    brightness: Tensor
    hue: Tensor
    sat: Tensor
    val: Tensor
    do_gray: Tensor
    do_blur: Tensor
    taps: Tensor  # (B, K) blur taps, the identity where no blur was drawn


def _draw(images: Tensor, cfg: StrongAugCfg, generator: Optional[torch.Generator]) -> _Draws:
    """All draws from one (B, 9) uniform tensor, so image i's draws do not depend on the batch
    size or on the other images."""
    b = images.shape[0]
    gen_device = generator.device if generator is not None else images.device
    u = torch.rand(b, 9, generator=generator, device=gen_device).to(images.device)
    u = u.to(torch.float32)
    do_color = u[:, 0] < cfg.color_prob
    contrast = _uniform(u[:, 1], cfg.contrast).view(-1, 1, 1, 1)
    brightness = _uniform(u[:, 2], cfg.brightness).view(-1, 1, 1, 1)
    hue = _uniform(u[:, 3], cfg.hue_shift)
    sat = _uniform(u[:, 4], cfg.saturation_shift)
    val = _uniform(u[:, 5], cfg.value_shift)
    do_gray = u[:, 6] < cfg.gray_prob
    do_blur = u[:, 7] < cfg.blur_prob
    # Kernel index: the first kernel whose cumulative probability exceeds the draw.
    cum = _constant(np.cumsum(cfg.blur_kernel_probs), u, (-1,), torch.float64)
    kidx = torch.searchsorted(cum, u[:, 8].double().contiguous(), right=True).clamp(max=len(cfg.blur_kernels) - 1)
    taps = blur_taps(cfg.blur_kernels, kidx, do_blur, images.dtype)
    return _Draws(do_color, contrast, brightness, hue, sat, val, do_gray, do_blur, taps)


def _colour(x: Tensor, d: _Draws, i: slice) -> Tensor:
    """Brightness/contrast, then the HSV shift, of images ``i`` of the batch."""
    jittered = (x * d.contrast[i]).add_(d.brightness[i] * 255.0).clamp_(0, 255)  # in place: same arithmetic
    return shift_hsv(jittered, d.hue[i], d.sat[i], d.val[i]).to(x.dtype)


def strong_augment(images: Tensor, cfg: StrongAugCfg, generator: Optional[torch.Generator] = None,
                   per_image: Optional[bool] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> Tensor:
    """Colour jitter + HSV shift (p=color_prob), grey (p=gray_prob), Gaussian blur (p=blur_prob).

    ``images``: (B,3,H,W) float RGB in 0..255, or normalised with ``mean``/``std`` if they
    are given (then undone before the steps and redone after them); returns the same
    layout. Every
    image gets its own draws; all draws come from one (B, 9) uniform tensor, so
    image i's draws do not depend on the batch size or on the other images.
    ``per_image`` (the default on the CPU): one image at a time, each step only if
    drawn, so the image stays in cache through its steps and no work is thrown away.
    Otherwise (a GPU) each step runs on the whole batch and is kept per image by an
    exact 0/1 select, with no data-dependent indexing and no host sync. Every image's
    result depends on that image alone, so both give the same bits.
    """
    if not cfg.enabled:
        return images
    if (mean is not None) != (std is not None):
        raise ValueError("strong_augment: give both mean and std, or neither")
    if per_image is None:
        per_image = images.device.type == "cpu"
    draws = _draw(images, cfg, generator)
    if per_image:
        return _augment_each(images, cfg, draws, mean, std)
    return _augment_batch(images, cfg, draws, mean, std)


def _augment_each(images: Tensor, cfg: StrongAugCfg, d: _Draws, mean: Optional[Sequence[float]],
                  std: Optional[Sequence[float]]) -> Tensor:
    """``strong_augment`` one image at a time, each step only where drawn."""
    normalised = mean is not None
    out = torch.empty_like(images)
    for i, (c, g, bl) in enumerate(zip(d.do_color.tolist(), d.do_gray.tolist(), d.do_blur.tolist())):
        x = denormalize(images[i:i + 1], mean, std) if normalised else images[i:i + 1]
        if c and cfg.color_prob > 0:
            x = _colour(x, d, slice(i, i + 1))
        if g and cfg.gray_prob > 0:
            x = to_gray(x)
        if bl and cfg.blur_prob > 0:
            x = blur_batch(x, d.taps[i:i + 1])
        o = torch.clamp(x, 0, 255, out=out[i:i + 1])
        if normalised:  # normalize's arithmetic, in place in the output
            o.div_(255.0).sub_(_constant(mean, o)).div_(_constant(std, o))
    return out


def _augment_batch(images: Tensor, cfg: StrongAugCfg, d: _Draws, mean: Optional[Sequence[float]],
                   std: Optional[Sequence[float]]) -> Tensor:
    """``strong_augment`` on the whole batch, each step kept per image by an exact 0/1 select."""
    normalised = mean is not None

    def keep(new: Tensor, old: Tensor, chosen: Tensor) -> Tensor:
        return torch.lerp(old, new, chosen.to(old.dtype).view(-1, 1, 1, 1))  # exact for a 0/1 weight

    x = denormalize(images, mean, std) if normalised else images
    if cfg.color_prob > 0:
        x = keep(_colour(x, d, slice(None)), x, d.do_color)
    if cfg.gray_prob > 0:
        x = keep(to_gray(x), x, d.do_gray)
    if cfg.blur_prob > 0:
        x = blur_batch(x, d.taps)  # identity taps leave an unblurred image's bits unchanged
    return normalize(x.clamp(0, 255), mean, std) if normalised else x.clamp(0, 255)

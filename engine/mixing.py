"""Boundary-enhanced ClassMix (spec second-stage §4.2), batched on the training device.

The reference mixes sample by sample in a Python loop on the CPU with OpenCV
morphology (QUIRK noted in the spec). Here everything that touches pixels is a
batched tensor op on the images' device; the only trip to the host is the tiny
B×C class-presence matrix, because the class choice must consume Python's and
NumPy's global RNGs in exactly the reference's order to be faithful.
"""
from __future__ import annotations

import math
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from utils.config import MethodCfg
from utils.voc import IGNORE_INDEX


def boundary_band(alpha: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Artificial boundary of a paste mask: (dilate(α) − erode(α), erode(α)), both float (B,H,W).

    Square (2·size+1)² kernel, one iteration each, OpenCV's default borders: for
    erosion pixels outside the image count as object, for dilation as
    background. max_pool2d's implicit −inf padding gives exactly that: outside
    pixels never win the max, so dilation sees background there and erosion
    (−maxpool(−α)) sees object. A sample whose α is constant over the image gets
    all-zero band and inside, as in the reference (it skips the morphology then).
    """
    if alpha.dim() != 3:
        raise ValueError(f"alpha must be (B,H,W), got shape {tuple(alpha.shape)}")
    a = alpha.float().unsqueeze(1)
    k = 2 * size + 1
    dilated = F.max_pool2d(a, k, stride=1, padding=size)
    eroded = -F.max_pool2d(-a, k, stride=1, padding=size)
    flat = a.flatten(1)
    varies = (flat.amax(1) != flat.amin(1)).view(-1, 1, 1, 1)
    band = torch.where(varies, dilated - eroded, torch.zeros_like(a))
    inside = torch.where(varies, eroded, torch.zeros_like(a))
    return band.squeeze(1), inside.squeeze(1)


def choose_paste_masks(source_label: Tensor, num_classes: int, ignore_background: bool, mix_prob: float,
                       py_rng: Any = random, np_rng: Any = np.random) -> tuple[Tensor, Tensor]:
    """ClassMix paste masks α (B,H,W float) and whether each sample mixes (B,) bool.

    Random draws in the reference's order, one sample after the other:
    ``py_rng.random() < mix_prob`` decides whether the sample mixes; if it does,
    ``np_rng.choice(candidates, ceil(n/2), replace=False)`` picks the pasted
    classes, where the candidates are the source's classes (ascending, as
    ``np.unique`` lists them) without the ignore value and, if
    ``ignore_background``, without class 0. With no candidate the reference's
    ``choice(empty, 0)`` consumes no randomness, so skipping the call is the same.
    """
    if source_label.dim() != 3:
        raise ValueError(f"source_label must be (B,H,W), got shape {tuple(source_label.shape)}")
    b = source_label.shape[0]
    device = source_label.device
    # 255 goes to an extra column that is never a candidate and never chosen.
    idx = torch.where(source_label == IGNORE_INDEX, num_classes, source_label.long()).flatten(1)
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=device)
    present.scatter_(1, idx, True)
    # The one host transfer: a B×C bool matrix the scalar draws need.
    present_np = present[:, :num_classes].cpu().numpy()

    chosen = np.zeros((b, num_classes + 1), dtype=bool)
    mixed = np.zeros(b, dtype=bool)
    for i in range(b):
        if not py_rng.random() < mix_prob:
            continue
        mixed[i] = True
        candidates = np.flatnonzero(present_np[i])
        if ignore_background:
            candidates = candidates[candidates != 0]
        n = len(candidates)
        if n == 0:
            continue
        picked = np_rng.choice(candidates, int(math.ceil(n / 2)), replace=False)
        chosen[i, picked] = True

    chosen_t = torch.from_numpy(chosen).to(device, non_blocking=True)
    alpha = torch.gather(chosen_t, 1, idx).view_as(source_label).float()
    return alpha, torch.from_numpy(mixed).to(device, non_blocking=True)


def _squeeze_mask(mask: Tensor) -> Tensor:
    # The loader may hand masks as (B,1,H,W); everything here works on (B,H,W).
    return mask.squeeze(1) if mask.dim() == 4 else mask


def mix_batch(images: Tensor, offline_label: Tensor, offline_mask: Tensor, online_label: Optional[Tensor],
              online_mask: Optional[Tensor], warmup: bool, cfg: MethodCfg, num_classes: int,
              py_rng: Any = random, np_rng: Any = np.random) -> dict[str, Tensor]:
    """Mix the batch halves both ways (spec §4.2); returns images, target, mask, band (+ inside, alpha, mixed).

    Output sample 2i is mix(A_i ← B'_i) and 2i+1 is mix(B'_i ← A_i), where A is
    the first half of the batch and B' the second. A mixed sample's target and
    mask are the blended online label and mask (the offline ones during
    warm-up); an unmixed sample is its base with the offline label and mask.
    The band is the paste mask's boundary after warm-up and zero during it.
    With ``cfg.mixing`` off the batch comes back in its own order with offline
    targets and a zero band.
    """
    offline_mask = _squeeze_mask(offline_mask)
    b = images.shape[0]
    zeros = torch.zeros(offline_label.shape, dtype=torch.float32, device=images.device)
    if not cfg.mixing:
        return {"images": images, "target": offline_label, "mask": offline_mask, "band": zeros,
                "inside": zeros.clone(), "alpha": zeros.clone(),
                "mixed": torch.zeros(b, dtype=torch.bool, device=images.device)}
    if b % 2:
        raise ValueError(f"BECO mixes batch halves, so the batch size must be even (got {b})")
    if not warmup and (online_label is None or online_mask is None):
        raise ValueError("after warm-up mix_batch needs the online label and mask")

    half = b // 2
    first = torch.arange(half, device=images.device)
    second = first + half
    base = torch.stack([first, second], 1).flatten()    # d1 of each output sample
    source = torch.stack([second, first], 1).flatten()  # d2, whose classes get pasted

    if warmup:
        # The reference picks classes from the source's offline label as is: the
        # offline mask does not restrict it (spec §4.2, "Before epoch W").
        src_map = offline_label[source]
    else:
        online_mask = _squeeze_mask(online_mask)
        src_map = torch.where(online_mask[source].bool(), online_label[source],
                              torch.full_like(online_label[source], IGNORE_INDEX))
    alpha, mixed = choose_paste_masks(src_map, num_classes, cfg.ignore_background, cfg.mix_prob, py_rng, np_rng)

    sel = alpha.bool()
    a = alpha.to(images.dtype).unsqueeze(1)
    out_images = images[base] * (1 - a) + images[source] * a
    # With a binary α the blend of integer maps is a select; it also keeps 255 exact.
    if warmup:
        blend_label = torch.where(sel, offline_label[source], offline_label[base])
        blend_mask = torch.where(sel, offline_mask[source], offline_mask[base])
        band, inside = zeros, zeros.clone()
    else:
        online_mask = online_mask.to(offline_mask.dtype)
        online_label = online_label.to(offline_label.dtype)
        blend_label = torch.where(sel, online_label[source], online_label[base])
        blend_mask = torch.where(sel, online_mask[source], online_mask[base])
        band, inside = boundary_band(alpha, cfg.boundary_size)
    # Mixed samples take the blended maps even when α is empty (no candidate
    # class): the reference decides on the coin flip, not on α.
    m = mixed.view(-1, 1, 1)
    target = torch.where(m, blend_label, offline_label[base])
    mask = torch.where(m, blend_mask, offline_mask[base])
    return {"images": out_images, "target": target, "mask": mask, "band": band, "inside": inside,
            "alpha": alpha, "mixed": mixed}

"""The step's fast CPU paths give what the plain formulations give (issue 14).

Each fast path is checked against the straightforward code it replaced: softmax + max for
the online labels, gathered copies and torch.where for the mixing, max-pooling for the
band, the elementwise HSV arithmetic for the colour tables, the whole-batch path for the
per-image augmentation, a dense per-image convolution for the blur.
"""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.beco as beco
from engine.beco import confident_labels
from engine.mixing import boundary_band, choose_paste_masks, mix_batch
from engine.strong_aug import (blur_batch, blur_taps, gaussian_kernel1d, hsv_u8_to_rgb, rgb_to_hsv_u8, shift_hsv,
                               strong_augment)
from tests.conftest import REPO
from engine.config import load_config
from utils.voc import IGNORE_INDEX


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs/beco_voc.yaml")


# ---------------------------------------------------------------- online labels

@pytest.mark.parametrize("classes,shape,dtype", [(21, (2, 64, 80), torch.float32), (81, (1, 33, 47), torch.float32),
                                                 (3, (3, 5, 7), torch.float32), (300, (1, 9, 11), torch.float32),
                                                 (21, (2, 16, 16), torch.bfloat16)])
def test_confident_labels_equal_softmax_max(classes, shape, dtype, monkeypatch):
    g = torch.Generator().manual_seed(classes)
    logits = (torch.randn(shape[0], classes, *shape[1:], generator=g) * 4).to(dtype)
    logits[:, 1] = logits[:, 0]                       # ties: the first class wins, as max(1) says
    logits[0, :, 0, 0] = 2.5                          # an all-equal pixel: class 0
    prob, label = logits.float().softmax(1).max(1)
    threshold = 0.95
    for chunk in (7, 1 << 15):                        # the CPU's pieces change nothing
        monkeypatch.setattr(beco, "_CPU_CHUNK_PIXELS", chunk)
        ours, confident = confident_labels(logits, threshold)
        assert ours.dtype == torch.int64 and confident.dtype == torch.int64
        assert torch.equal(ours, label)
        assert ours[0, 0, 0] == 0
        differ = confident != (prob > threshold).long()
        # 1/Σexp and softmax's own top value may differ in the last bit only.
        assert not (differ & ((prob - threshold).abs() > 1e-6)).any()


def test_confident_labels_on_known_probabilities():
    # Two classes at logit gap log(19): top probability 0.95 exactly in real arithmetic.
    logits = torch.tensor([[math.log(19.0), 0.0], [5.0, 0.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 3)
    label, confident = confident_labels(logits, 0.95)
    assert label.tolist() == [[[0, 0, 0]]]
    assert confident[0, 0, 1] == 1 and confident[0, 0, 2] == 0


def test_confident_labels_nan_logits_stay_in_range():
    logits = torch.full((1, 4, 2, 2), float("nan"))
    label, confident = confident_labels(logits, 0.5)
    assert ((label >= 0) & (label < 4)).all() and not confident.any()


# ---------------------------------------------------------------- mixing

def gathered_mix(images, off_label, off_mask, on_label, on_mask, warmup, cfg, num_classes, py_rng, np_rng):
    """The mixing as first written: gathered base/source copies and torch.where."""
    b = images.shape[0]
    half = b // 2
    first = torch.arange(half)
    base = torch.stack([first, first + half], 1).flatten()
    source = torch.stack([first + half, first], 1).flatten()
    if warmup:
        src_map = off_label[source]
    else:
        src_map = torch.where(on_mask[source].bool(), on_label[source], torch.full_like(on_label[source], IGNORE_INDEX))
    alpha, mixed = choose_paste_masks(src_map, num_classes, cfg.ignore_background, cfg.mix_prob, py_rng, np_rng)
    sel = alpha.bool()
    a = alpha.unsqueeze(1)
    out_images = images[base] * (1 - a) + images[source] * a
    lab, msk = (off_label, off_mask) if warmup else (on_label, on_mask)
    blend_label = torch.where(sel, lab[source], lab[base])
    blend_mask = torch.where(sel, msk[source], msk[base])
    m = mixed.view(-1, 1, 1)
    if warmup:
        band = torch.zeros_like(alpha)
    else:
        k = 2 * cfg.boundary_size + 1
        pooled = alpha.unsqueeze(1)
        dil = F.max_pool2d(pooled, k, 1, cfg.boundary_size)
        ero = -F.max_pool2d(-pooled, k, 1, cfg.boundary_size)
        flat = alpha.flatten(1)
        varies = (flat.amax(1) != flat.amin(1)).view(-1, 1, 1, 1)
        band = torch.where(varies, dil - ero, torch.zeros_like(dil)).squeeze(1)
    return {"images": out_images, "target": torch.where(m, blend_label, off_label[base]),
            "mask": torch.where(m, blend_mask, off_mask[base]), "band": band, "alpha": alpha, "mixed": mixed}


@pytest.mark.parametrize("trial", range(12))
def test_mix_batch_equals_gathered_formulation(cfg, trial):
    g = torch.Generator().manual_seed(trial)
    b, h, w, c = 2 * (1 + trial % 3), 24 + trial, 30, 21
    images = torch.randn(b, 3, h, w, generator=g)
    off_label = torch.randint(0, c, (b, h // 6 + 1, w // 6 + 1), generator=g)
    off_label = F.interpolate(off_label[:, None].float(), size=(h, w))[:, 0].long()
    off_label[torch.rand(off_label.shape, generator=g) < 0.1] = IGNORE_INDEX
    off_mask = (torch.rand(b, h, w, generator=g) < 0.5).long()
    on_label = torch.randint(0, c, (b, h, w), generator=g)
    on_mask = (torch.rand(b, h, w, generator=g) < 0.7).long()
    method = dataclasses.replace(cfg.method, mix_prob=(0.5, 1.0, 0.0)[trial % 3], boundary_size=1 + trial % 2,
                                 ignore_background=bool(trial % 2))
    warmup = trial % 4 == 0
    ours = mix_batch(images, off_label, off_mask, on_label, on_mask, warmup, method, c,
                     random.Random(trial), np.random.RandomState(trial))
    ref = gathered_mix(images, off_label, off_mask, on_label, on_mask, warmup, method, c,
                       random.Random(trial), np.random.RandomState(trial))
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_band_equals_max_pooling():
    alpha = (torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    alpha[2] = 1.0  # constant: zero band and inside
    for size in (1, 2, 3):
        band, inside = boundary_band(alpha, size)
        k = 2 * size + 1
        dil = F.max_pool2d(alpha[:, None], k, 1, size)[:, 0]
        ero = -F.max_pool2d(-alpha[:, None], k, 1, size)[:, 0]
        assert torch.equal(band[:2], (dil - ero)[:2]) and torch.equal(inside[:2], ero[:2])
        assert band[2].abs().sum() == 0 and inside[2].abs().sum() == 0


# ---------------------------------------------------------------- colour tables, per-image augmentation

def arithmetic_shift_hsv(images, hue, sat, val):
    """shift_hsv as elementwise arithmetic, the way it was computed before the tables."""
    hsv = rgb_to_hsv_u8(images.clamp(0, 255).floor()).float()
    hue, sat, val = (t.view(-1, 1, 1).float() for t in (hue, sat, val))
    h = torch.remainder(hsv[:, 0] + hue, 180).floor()
    h = torch.where(h >= 180, h - 180, h)
    s = (hsv[:, 1] + sat).clamp(0, 255).floor()
    v = (hsv[:, 2] + val).clamp(0, 255).floor()
    return hsv_u8_to_rgb(torch.stack([h, s, v], 1))


def test_colour_tables_equal_the_arithmetic():
    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(3, 3, 6, 7, generator=g) * 300 - 20, size=(48, 56), mode="bilinear")
    noise = torch.rand(3, 3, 48, 56, generator=g) * 255
    extremes = torch.tensor([0.0, 255.0, 254.6, -3.0, 300.0, 127.5]).repeat(3, 3, 48, 56 // 6 + 1)[..., :56]
    for images in (smooth, noise, extremes):
        for shifts in ((-20.0, -30.0, -20.0), (19.9, 29.9, 19.9), (-10.5, 0.0, 0.3), (0.0, 0.0, 0.0)):
            hue, sat, val = (torch.full((3,), v) + torch.tensor([0.0, 0.37, -0.61]) for v in shifts)
            assert torch.equal(shift_hsv(images, hue, sat, val), arithmetic_shift_hsv(images, hue, sat, val))


def test_per_image_augmentation_equals_whole_batch(cfg):
    images = torch.rand(6, 3, 40, 52, generator=torch.Generator().manual_seed(2)) * 255
    for seed in range(8):
        a = strong_augment(images, cfg.method.strong_aug, torch.Generator().manual_seed(seed), per_image=True)
        b = strong_augment(images, cfg.method.strong_aug, torch.Generator().manual_seed(seed), per_image=False)
        assert torch.equal(a, b)


def test_blur_equals_dense_convolution_and_keeps_unblurred_bits():
    images = torch.rand(4, 3, 30, 34, generator=torch.Generator().manual_seed(4)) * 255
    taps = blur_taps((3, 5), torch.tensor([0, 1, 1, 0]), torch.tensor([True, True, False, False]), torch.float32)
    out = blur_batch(images, taps)
    for i, k in ((0, 3), (1, 5)):
        k1 = gaussian_kernel1d(k)
        kernel = (k1[:, None] * k1[None, :]).expand(3, 1, k, k)
        ref = F.conv2d(F.pad(images[i:i + 1], (k // 2,) * 4, mode="reflect"), kernel, groups=3)
        assert (out[i:i + 1] - ref).abs().max() < 1e-3
    assert torch.equal(out[2:], images[2:])


# ---------------------------------------------------------------- optimiser

def test_foreach_sgd_equals_one_tensor_at_a_time(cfg):
    """optim.implementation: foreach (our default) takes the same SGD steps bit for bit."""
    from models import build_optimizer
    params = {}
    for impl in ("default", "foreach"):
        torch.manual_seed(0)
        nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))]
        opt = build_optimizer(nets, dataclasses.replace(cfg.optim, implementation=impl))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in nets[0].parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        params[impl] = [p.detach().clone() for p in nets[0].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params["default"], params["foreach"]))

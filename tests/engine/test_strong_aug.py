"""Strong augmentation (spec second-stage §4.3) against OpenCV / the reference's albumentations steps."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from engine.strong_aug import (denormalize, gaussian_blur, gaussian_kernel1d, hsv_u8_to_rgb, normalize,
                               rgb_to_hsv_u8, shift_hsv, strong_augment, to_gray)
from tests.conftest import REPO
from engine.config import load_config
from utils.config import StrongAugCfg


@pytest.fixture(scope="module")
def aug_cfg() -> StrongAugCfg:
    return load_config(REPO / "configs/beco_voc.yaml").method.strong_aug


def with_(cfg: StrongAugCfg, **kw) -> StrongAugCfg:
    return dataclasses.replace(cfg, **kw)


def to_t(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> 1x3xHxW float."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def to_np(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy()


def random_u8(seed: int, h: int = 24, w: int = 128) -> np.ndarray:
    # OpenCV's uint8 HSV->RGB converts each row in blocks of 16 px (the SSE baseline, also
    # what cv2.setUseOptimized(False) runs), 32 (AVX2) or 64 (AVX-512), and the last
    # (width mod block) px in a scalar tail that rounds where the blocks truncate: one level
    # apart on ~3/4 of those pixels. Rows of a multiple of 64 px have no tail under any x86
    # dispatch, so the oracle is the same on every CPU (96 px left 32 to the tail on AVX-512).
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(params=[True, False], ids=["cv2-optimised", "cv2-baseline"])
def opencv_paths(request):
    """Every OpenCV-compared test runs against OpenCV's dispatched (CPU-specific) kernels and
    against its baseline build (``cv2.setUseOptimized(False)``: the same code on every x86)."""
    before = cv2.useOptimized()
    cv2.setUseOptimized(request.param)
    yield request.param
    cv2.setUseOptimized(before)


# ---------------------------------------------------------------- HSV

def test_rgb_to_hsv_is_opencv_exact(opencv_paths):
    img = random_u8(0)
    img[0, :8] = [[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 1],
                  [1, 0, 255]]
    ref = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(to_np(rgb_to_hsv_u8(to_t(img))), ref)


def test_hsv_to_rgb_matches_opencv(opencv_paths):
    rng = np.random.default_rng(1)
    h, s = np.meshgrid(np.arange(180), np.arange(256), indexing="ij")   # every hue x saturation
    hsv = np.stack([h, s, rng.integers(0, 256, h.shape)], -1).astype(np.uint8)   # 180 rows of 256 px
    ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(int)
    ours = to_np(hsv_u8_to_rgb(torch.from_numpy(hsv).permute(2, 0, 1)[None].int())).astype(int)
    # Bit-exact with the dispatched kernels of x86 wheels (AVX2 and up fuse the multiply-adds
    # as we do); the baseline build has no FMA and differs by one level on ~0.015 %.
    assert np.abs(ours - ref).max() <= 1
    assert (ours != ref).mean() < 1e-3


def test_hsv_round_trip_matches_opencv(opencv_paths):
    img = random_u8(2)
    ref = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), cv2.COLOR_HSV2RGB).astype(int)
    ours = to_np(hsv_u8_to_rgb(rgb_to_hsv_u8(to_t(img)))).astype(int)
    assert np.abs(ours - ref).max() <= 2


def reference_shift_hsv(img: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """albumentations' uint8 HueSaturationValue (the reference's step), written with cv2 LUTs."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hh, ss, vv = cv2.split(hsv)
    lut = np.arange(0, 256, dtype=np.int16)
    hh = cv2.LUT(hh, np.mod(lut + hue, 180).astype(np.uint8))
    ss = cv2.LUT(ss, np.clip(lut + sat, 0, 255).astype(np.uint8))
    vv = cv2.LUT(vv, np.clip(lut + val, 0, 255).astype(np.uint8))
    return cv2.cvtColor(cv2.merge((hh, ss, vv)), cv2.COLOR_HSV2RGB)


def test_shift_matches_opencv_reference_per_image(opencv_paths):
    shifts = [(17.3, -25.2, 12.9), (-19.6, 28.4, -18.1), (0.4, 0.0, 0.0), (-0.3, -30.0, 20.0)]
    imgs = [random_u8(10 + i) for i in range(len(shifts))]
    batch = torch.cat([to_t(im) for im in imgs])
    hue, sat, val = (torch.tensor(c) for c in zip(*shifts))
    out = shift_hsv(batch, hue, sat, val)
    for i, (im, (h, s, v)) in enumerate(zip(imgs, shifts)):
        ref = reference_shift_hsv(im, h, s, v).astype(int)
        ours = to_np(out[i:i + 1]).astype(int)
        assert np.abs(ours - ref).max() <= 1
        assert (ours != ref).mean() < 1e-3


def test_hue_wraps_around(opencv_paths):
    hsv_in = rgb_to_hsv_u8(to_t(random_u8(3)))
    for shift in (-20.0, 20.0, 179.5, -179.5):
        out = rgb_to_hsv_u8(shift_hsv(hsv_u8_to_rgb(hsv_in), torch.tensor([shift]), torch.zeros(1), torch.zeros(1)))
        assert out[:, 0].min() >= 0 and out[:, 0].max() <= 179
    # A red pixel (hue 0) shifted by -10.5 lands on hue 169 (floor of 169.5), i.e. it wraps.
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    shifted = shift_hsv(red, torch.tensor([-10.5]), torch.zeros(1), torch.zeros(1))
    assert rgb_to_hsv_u8(shifted)[0, 0, 0, 0] == 169
    ref = reference_shift_hsv(np.array([[[255, 0, 0]]], np.uint8), -10.5, 0, 0)
    np.testing.assert_array_equal(to_np(shifted).astype(np.uint8), ref)


def test_colour_branch_matches_reference_chain(aug_cfg, opencv_paths):
    """Brightness/contrast LUT then HSV shift, with the draws taken from the documented (B, 9) layout."""
    cfg = with_(aug_cfg, color_prob=1.0, gray_prob=0.0, blur_prob=0.0)
    imgs = [random_u8(20 + i, 16, 64) for i in range(3)]
    out = strong_augment(torch.cat([to_t(im) for im in imgs]), cfg, torch.Generator().manual_seed(5))
    u = torch.rand(3, 9, generator=torch.Generator().manual_seed(5)).double()
    lo = lambda r, x: r[0] + (r[1] - r[0]) * x  # noqa: E731
    for i, im in enumerate(imgs):
        a, b = lo(cfg.contrast, u[i, 1]).item(), lo(cfg.brightness, u[i, 2]).item()
        lut = np.clip(np.arange(256, dtype=np.float32) * a + b * 255, 0, 255).astype(np.uint8)
        jittered = cv2.LUT(im, lut)
        ref = reference_shift_hsv(jittered, *(lo(r, u[i, k]).item() for r, k in
                                             ((cfg.hue_shift, 3), (cfg.saturation_shift, 4), (cfg.value_shift, 5))))
        ours = to_np(out[i:i + 1]).astype(int)
        assert np.abs(ours - ref.astype(int)).max() <= 2
        assert (ours != ref).mean() < 0.01


# ---------------------------------------------------------------- grey, blur

def test_gray_matches_opencv(opencv_paths):
    img = random_u8(4)
    g = to_gray(to_t(img))
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 0], g[:, 2])
    ref = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    assert np.abs(g[0, 0].numpy() - ref).max() <= 1


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_kernel_is_opencv_default(k: int):
    # OpenCV's fixed tables for sigma <= 0 (what albumentations' GaussianBlur gets).
    np.testing.assert_allclose(gaussian_kernel1d(k).numpy(), cv2.getGaussianKernel(k, 0).ravel(), atol=1e-7)


@pytest.mark.parametrize("k", [9, 11])
def test_large_kernel_uses_opencv_sigma_rule(k: int):
    # OpenCV 4.x samples a Gaussian with its sigma rule beyond the tables (5.x added a table for 9).
    sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8
    np.testing.assert_allclose(gaussian_kernel1d(k).numpy(), cv2.getGaussianKernel(k, sigma).ravel(), atol=1e-7)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_blur_matches_opencv(k: int, opencv_paths):
    img = np.random.default_rng(5).uniform(0, 255, (17, 23, 3)).astype(np.float32)
    ref = cv2.GaussianBlur(img, (k, k), 0)    # sigma 0, as albumentations calls it; default border
    ours = to_np(gaussian_blur(to_t(img), k))
    assert np.abs(ours - ref).max() < 1e-3


# ---------------------------------------------------------------- strong_augment

def test_all_probabilities_zero_is_identity(aug_cfg):
    x = torch.rand(3, 3, 16, 20) * 255
    cfg = with_(aug_cfg, color_prob=0.0, gray_prob=0.0, blur_prob=0.0)
    assert torch.equal(strong_augment(x, cfg, torch.Generator().manual_seed(0)), x)
    assert torch.equal(strong_augment(x, with_(aug_cfg, enabled=False), None), x)


def test_reproducible_and_in_range(aug_cfg):
    x = torch.rand(6, 3, 16, 20) * 255
    x[0] = 0
    x[1] = 255
    a = strong_augment(x, aug_cfg, torch.Generator().manual_seed(3))
    b = strong_augment(x, aug_cfg, torch.Generator().manual_seed(3))
    c = strong_augment(x, aug_cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 255


def test_images_get_independent_draws(aug_cfg):
    cfg = with_(aug_cfg, color_prob=1.0, gray_prob=0.0, blur_prob=0.0)
    x = torch.from_numpy(random_u8(6, 8, 16)).permute(2, 0, 1).float()[None].repeat(4, 1, 1, 1)
    out = strong_augment(x, cfg, torch.Generator().manual_seed(0))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(out[i], out[j])
    # An image's draws do not depend on the batch it sits in (row i of the draw matrix).
    out2 = strong_augment(x[:2], cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out2, out[:2])


def test_step_frequencies(aug_cfg):
    """On impulse images, the blur rate, the kernel mix and the grey rate follow the config."""
    n = 3000
    x = torch.zeros(n, 3, 9, 9)
    x[:, 0, 4, 4] = 255.0
    x[:, 1, 4, 4] = 128.0
    out = strong_augment(x, with_(aug_cfg, color_prob=0.0), torch.Generator().manual_seed(1))
    centre = out[:, 0, 4, 4]
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1)
    blurred = (out[:, :, 3, 4] != 0).any(1)   # the impulse leaked into its neighbour
    assert abs(grey.float().mean().item() - aug_cfg.gray_prob) < 0.03
    assert abs(blurred.float().mean().item() - aug_cfg.blur_prob) < 0.03
    # Non-grey blurred impulses keep centre 255*w_c^2: 0.25 for k=3, 0.140625 for k=5.
    col = blurred & ~grey
    k3 = torch.isclose(centre[col], torch.tensor(255 * 0.25))
    k5 = torch.isclose(centre[col], torch.tensor(255 * 0.140625))
    assert (k3 | k5).all()
    assert abs(k3.float().mean().item() - aug_cfg.blur_kernel_probs[0]) < 0.04


def test_normalize_round_trip():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.rand(2, 3, 5, 6) * 255
    n = normalize(x, mean, std)
    torch.testing.assert_close(n[:, 0], (x[:, 0] / 255 - mean[0]) / std[0])
    torch.testing.assert_close(denormalize(n, mean, std), x, atol=1e-4, rtol=0)


def test_one_pass_batch_blur_equals_per_kernel_blurs(aug_cfg):
    """The per-image taps (each image's kernel, or the identity) give what blurring the whole
    batch with each kernel and selecting per image gives: identity images bit for bit, blurred
    ones to float rounding."""
    from engine.strong_aug import blur_batch, blur_taps
    x = torch.rand(5, 3, 19, 23, generator=torch.Generator().manual_seed(1)) * 255
    pick = torch.tensor([0, 1, 0, 1, 0])
    do_blur = torch.tensor([True, True, False, False, True])
    out = blur_batch(x, blur_taps([3, 5], pick, do_blur, x.dtype))
    for i, (k, on) in enumerate(zip((3, 5, 3, 5, 3), do_blur.tolist())):
        if on:
            torch.testing.assert_close(out[i], gaussian_blur(x[i:i + 1], k)[0], atol=1e-4, rtol=0)
        else:
            assert torch.equal(out[i], x[i])

"""Boundary-enhanced ClassMix (spec second-stage §4.2): band oracles, OpenCV agreement, faithful draws."""
from __future__ import annotations

import dataclasses
import math
import random

import cv2
import numpy as np
import pytest
import torch

from engine.mixing import boundary_band, choose_paste_masks, mix_batch
from tests.conftest import REPO
from engine.config import load_config
from utils.config import MethodCfg

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def method_cfg() -> MethodCfg:
    return load_config(REPO / "configs/beco_voc.yaml").method


def with_(cfg: MethodCfg, **kw) -> MethodCfg:
    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------- boundary band

def cv2_band(alpha: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's getBoundry: OpenCV morphology with default borders, zeros for a constant α."""
    if len(np.unique(alpha)) == 1:
        return np.zeros_like(alpha, dtype=np.float32), np.zeros_like(alpha, dtype=np.float32)
    kernel = np.ones((2 * size + 1, 2 * size + 1), np.uint8)
    a = alpha.astype(np.uint8) * 255
    ero = (cv2.erode(a, kernel, iterations=1) > 254).astype(np.float32)
    dil = (cv2.dilate(a, kernel, iterations=1) > 254).astype(np.float32)
    return dil - ero, ero


def hand_made_maps(h: int = 24, w: int = 30) -> dict[str, np.ndarray]:
    maps = {}
    m = np.zeros((h, w), np.uint8); m[5:12, 8:20] = 1; maps["square"] = m
    m = np.zeros((h, w), np.uint8); m[3:20, 4:25] = 1; m[8:15, 10:18] = 0; maps["ring"] = m
    m = np.zeros((h, w), np.uint8); m[4:10, 4:12] = 1; m[10:16, 6:18] = 1; maps["touching"] = m
    maps["all0"] = np.zeros((h, w), np.uint8)
    maps["all1"] = np.ones((h, w), np.uint8)
    m = np.zeros((h, w), np.uint8); m[:5, 7:14] = 1; maps["top"] = m
    m = np.zeros((h, w), np.uint8); m[-4:, 10:20] = 1; maps["bottom"] = m
    m = np.zeros((h, w), np.uint8); m[6:15, :3] = 1; maps["left"] = m
    m = np.zeros((h, w), np.uint8); m[6:15, -2:] = 1; maps["right"] = m
    m = np.zeros((h, w), np.uint8); m[:4, :5] = 1; m[-3:, -6:] = 1; m[:2, -2:] = 1; m[-5:, :1] = 1
    maps["corners"] = m
    m = np.zeros((h, w), np.uint8); m[:, 12:15] = 1; maps["full_height_stripe"] = m
    m = np.zeros((h, w), np.uint8); m[10, 10] = 1; m[3, 3] = 1; maps["dots"] = m
    m = np.ones((h, w), np.uint8); m[11, 14] = 0; maps["one_hole"] = m
    maps["random"] = (np.random.default_rng(0).random((h, w)) < 0.4).astype(np.uint8)
    return maps


def test_spec_oracles():
    a = torch.zeros(2, 40, 48)
    a[0, 10:20, 10:28] = 1          # 10x18 block inside the map
    a[1, :10] = 1                   # top 10 rows, full width ...
    a[1, 30:, 40:] = 1              # ... plus a 10x8 block in the bottom-right corner
    band, inside = boundary_band(a, 1)
    assert band[0].sum() == 112 and inside[0].sum() == 128
    assert band[1].sum() == 132 and inside[1].sum() == 495


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("name", list(hand_made_maps()))
def test_band_matches_opencv(name: str, size: int):
    m = hand_made_maps()[name]
    band, inside = boundary_band(torch.from_numpy(m)[None].float(), size)
    ref_band, ref_inside = cv2_band(m, size)
    np.testing.assert_array_equal(band[0].numpy(), ref_band)
    np.testing.assert_array_equal(inside[0].numpy(), ref_inside)
    assert band.dtype == torch.float32 and inside.dtype == torch.float32


@pytest.mark.parametrize("size", [1, 2])
def test_band_batched_equals_per_sample_opencv(size: int):
    maps = hand_made_maps()
    stack = np.stack([maps["ring"], maps["all1"], maps["corners"], maps["all0"]])
    band, inside = boundary_band(torch.from_numpy(stack).float(), size)
    for i in range(4):
        ref_band, ref_inside = cv2_band(stack[i], size)
        np.testing.assert_array_equal(band[i].numpy(), ref_band)
        np.testing.assert_array_equal(inside[i].numpy(), ref_inside)


# ---------------------------------------------------------------- class choice

def reference_choose(labels: np.ndarray, ignore_bg: bool, p: float, py_rng, np_rng) -> tuple[np.ndarray, np.ndarray]:
    """Straight per-sample version of the reference's draws (random_cls_mask), choice() even for n = 0."""
    alphas, mixed = [], []
    for lab in labels:
        if py_rng.random() < p:
            classes = np.unique(lab)
            classes = classes[classes != 255]
            if ignore_bg:
                classes = classes[classes != 0]
            n = len(classes)
            picked = np_rng.choice(classes, int((n + n % 2) / 2), replace=False)
            alphas.append(np.isin(lab, picked).astype(np.float32))
            mixed.append(True)
        else:
            alphas.append(np.zeros(lab.shape, np.float32))
            mixed.append(False)
    return np.stack(alphas), np.array(mixed)


def random_labels(b: int, seed: int, h: int = 12, w: int = 14) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((b, h, w), np.int64)
    for i in range(b):
        present = rng.choice(NUM_CLASSES, rng.integers(1, NUM_CLASSES + 1), replace=False)
        labels[i] = rng.choice(present, (h, w))
        labels[i][rng.random((h, w)) < 0.1] = 255
    labels[0] = 0                     # background only: no candidate
    labels[1, :, :] = 255             # nothing reliable: no candidate
    labels[2, :6] = 3                 # one candidate class (+ background)
    labels[2, 6:] = 0
    return labels


@pytest.mark.parametrize("ignore_bg", [True, False])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_choose_matches_reference_draws(ignore_bg: bool, p: float):
    labels = random_labels(12, seed=1)
    for seed in range(5):
        alpha, mixed = choose_paste_masks(torch.from_numpy(labels), NUM_CLASSES, ignore_bg, p,
                                          random.Random(seed), np.random.RandomState(seed))
        ref_alpha, ref_mixed = reference_choose(labels, ignore_bg, p, random.Random(seed),
                                                np.random.RandomState(seed))
        np.testing.assert_array_equal(alpha.numpy(), ref_alpha)
        np.testing.assert_array_equal(mixed.numpy(), ref_mixed)
        assert alpha.dtype == torch.float32 and mixed.dtype == torch.bool


def test_choose_leaves_rngs_in_reference_state():
    """Later draws stay in step with the reference: both rngs end in the same state."""
    labels = random_labels(10, seed=2)
    py_a, np_a = random.Random(7), np.random.RandomState(7)
    py_b, np_b = random.Random(7), np.random.RandomState(7)
    choose_paste_masks(torch.from_numpy(labels), NUM_CLASSES, True, 0.5, py_a, np_a)
    reference_choose(labels, True, 0.5, py_b, np_b)
    assert py_a.random() == py_b.random()
    assert np_a.randint(1 << 30) == np_b.randint(1 << 30)


def test_choose_background_never_pasted_and_half_the_classes():
    labels = random_labels(16, seed=3)
    for seed in range(10):
        alpha, mixed = choose_paste_masks(torch.from_numpy(labels), NUM_CLASSES, True, 1.0,
                                          random.Random(seed), np.random.RandomState(seed))
        assert mixed.all()
        for lab, a in zip(labels, alpha.numpy()):
            pasted = np.unique(lab[a == 1])
            assert 0 not in pasted and 255 not in pasted
            cands = set(np.unique(lab).tolist()) - {0, 255}
            assert len(pasted) == math.ceil(len(cands) / 2)
            # α covers every pixel of each chosen class and nothing else.
            np.testing.assert_array_equal(a == 1, np.isin(lab, pasted))
        assert alpha[0].sum() == 0 and alpha[1].sum() == 0    # no candidates: empty α


def test_choose_reproducible_and_default_global_rngs():
    labels = torch.from_numpy(random_labels(8, seed=4))
    random.seed(11); np.random.seed(11)
    a1, m1 = choose_paste_masks(labels, NUM_CLASSES, True, 0.5)
    random.seed(11); np.random.seed(11)
    a2, m2 = choose_paste_masks(labels, NUM_CLASSES, True, 0.5)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    a3, _ = choose_paste_masks(labels, NUM_CLASSES, True, 0.5, random.Random(11), np.random.RandomState(11))
    assert torch.equal(a1, a3)


# ---------------------------------------------------------------- mix_batch

class Scripted:
    """A py_rng whose random() returns a fixed sequence: decides which samples mix."""

    def __init__(self, values):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def make_batch(b: int = 4, h: int = 10, w: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Constant images with distinct values reveal which sample each output pixel came from.
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w) * 10 + 1
    off_label = torch.randint(0, NUM_CLASSES, (b, h, w), generator=g)
    off_mask = torch.randint(0, 2, (b, h, w), generator=g)
    on_label = torch.randint(0, NUM_CLASSES, (b, h, w), generator=g)
    on_mask = torch.randint(0, 2, (b, h, w), generator=g)
    return images.contiguous(), off_label, off_mask, on_label, on_mask


BASE = [0, 2, 1, 3]      # d1 of each output for B = 4: [A0<-B0, B0<-A0, A1<-B1, B1<-A1]
SOURCE = [2, 0, 3, 1]    # d2


def test_mix_prob_zero_keeps_bases_in_interleaved_order(method_cfg):
    images, off_label, off_mask, on_label, on_mask = make_batch()
    out = mix_batch(images, off_label, off_mask, on_label, on_mask, False, with_(method_cfg, mix_prob=0.0),
                    NUM_CLASSES, random.Random(0), np.random.RandomState(0))
    assert torch.equal(out["images"], images[BASE])
    assert torch.equal(out["target"], off_label[BASE])
    assert torch.equal(out["mask"], off_mask[BASE])
    assert out["band"].abs().sum() == 0 and not out["mixed"].any()


@pytest.mark.parametrize("warmup", [False, True])
def test_blend_of_every_field(method_cfg, warmup: bool):
    images, off_label, off_mask, on_label, on_mask = make_batch(seed=1)
    cfg = with_(method_cfg, mix_prob=1.0, ignore_background=False)
    out = mix_batch(images, off_label, off_mask, on_label, on_mask, warmup, cfg, NUM_CLASSES,
                    random.Random(3), np.random.RandomState(3))
    alpha = out["alpha"]
    assert out["mixed"].all() and (alpha.flatten(1).sum(1) > 0).all()
    a = alpha.unsqueeze(1)
    assert torch.equal(out["images"], images[BASE] * (1 - a) + images[SOURCE] * a)
    # Each output pixel holds its base's or its source's constant value.
    vals = out["images"][:, 0]
    base_val = torch.tensor(BASE).float().view(-1, 1, 1) * 10 + 1
    src_val = torch.tensor(SOURCE).float().view(-1, 1, 1) * 10 + 1
    assert torch.equal(vals, torch.where(alpha.bool(), src_val, base_val))
    lab, msk = (off_label, off_mask) if warmup else (on_label, on_mask)
    exp_target = (lab[BASE] * (1 - alpha) + lab[SOURCE] * alpha).long()
    exp_mask = (msk[BASE] * (1 - alpha) + msk[SOURCE] * alpha).long()
    assert torch.equal(out["target"], exp_target)
    assert torch.equal(out["mask"], exp_mask)
    # The pasted classes come from the source's map (online: only its reliable pixels).
    if warmup:
        src_map = off_label[SOURCE]
        assert out["band"].abs().sum() == 0 and out["inside"].abs().sum() == 0
    else:
        src_map = torch.where(on_mask[SOURCE].bool(), on_label[SOURCE], torch.full_like(on_label, 255)[SOURCE])
        band, inside = boundary_band(alpha, cfg.boundary_size)
        assert torch.equal(out["band"], band) and torch.equal(out["inside"], inside)
        assert out["band"].sum() > 0
    ref_alpha, _ = reference_choose(src_map.numpy(), False, 1.0, random.Random(3), np.random.RandomState(3))
    np.testing.assert_array_equal(alpha.numpy(), ref_alpha)


def test_unmixed_samples_carry_offline_maps_and_zero_band(method_cfg):
    images, off_label, off_mask, on_label, on_mask = make_batch(seed=2)
    cfg = with_(method_cfg, mix_prob=0.5, ignore_background=False)
    out = mix_batch(images, off_label, off_mask, on_label, on_mask, False, cfg, NUM_CLASSES,
                    Scripted([0.1, 0.9, 0.2, 0.7]), np.random.RandomState(0))
    assert out["mixed"].tolist() == [True, False, True, False]
    for i in (1, 3):
        assert torch.equal(out["images"][i], images[BASE[i]])
        assert torch.equal(out["target"][i], off_label[BASE[i]])
        assert torch.equal(out["mask"][i], off_mask[BASE[i]])
        assert out["band"][i].abs().sum() == 0 and out["alpha"][i].sum() == 0
    for i in (0, 2):   # mixed: online maps, offline ones discarded
        a = out["alpha"][i].bool()
        assert torch.equal(out["target"][i], torch.where(a, on_label[SOURCE[i]], on_label[BASE[i]]))
        assert torch.equal(out["mask"][i], torch.where(a, on_mask[SOURCE[i]], on_mask[BASE[i]]))
        assert out["band"][i].sum() > 0


def test_warmup_source_is_the_offline_label_unrestricted_by_its_mask(method_cfg):
    images, off_label, _, on_label, on_mask = make_batch(seed=3)
    off_mask = torch.zeros_like(off_label)        # nothing reliable offline: classes are still pasted
    cfg = with_(method_cfg, mix_prob=1.0, ignore_background=True)
    out = mix_batch(images, off_label, off_mask, None, None, True, cfg, NUM_CLASSES,
                    random.Random(0), np.random.RandomState(0))
    assert (out["alpha"].flatten(1).sum(1) > 0).all()
    assert out["band"].abs().sum() == 0
    a = out["alpha"].bool()
    assert torch.equal(out["target"], torch.where(a, off_label[SOURCE], off_label[BASE]))


def test_source_without_candidates_gives_empty_alpha(method_cfg):
    images, off_label, off_mask, on_label, on_mask = make_batch(seed=4)
    on_label[2] = 0                                # source of output 0: background only
    on_mask[0] = 0                                 # source of output 1: nothing reliable
    cfg = with_(method_cfg, mix_prob=1.0, ignore_background=True)
    out = mix_batch(images, off_label, off_mask, on_label, on_mask, False, cfg, NUM_CLASSES,
                    random.Random(0), np.random.RandomState(0))
    for i in (0, 1):
        assert out["mixed"][i] and out["alpha"][i].sum() == 0 and out["band"][i].sum() == 0
        assert torch.equal(out["images"][i], images[BASE[i]])
        # Still a mixed sample: its target is its own ONLINE label and mask (reference behaviour).
        assert torch.equal(out["target"][i], on_label[BASE[i]])
        assert torch.equal(out["mask"][i], on_mask[BASE[i]])


def test_boundary_size_and_mixing_off(method_cfg):
    images, off_label, off_mask, on_label, on_mask = make_batch(b=6, h=20, w=22, seed=5)
    cfg = with_(method_cfg, mix_prob=1.0, boundary_size=2)
    out = mix_batch(images, off_label, off_mask.unsqueeze(1), on_label, on_mask, False, cfg, NUM_CLASSES,
                    random.Random(1), np.random.RandomState(1))
    assert out["images"].shape == images.shape and out["mask"].shape == off_label.shape
    for i in range(6):
        ref_band, _ = cv2_band(out["alpha"][i].numpy().astype(np.uint8), 2)
        np.testing.assert_array_equal(out["band"][i].numpy(), ref_band)
    off = mix_batch(images, off_label, off_mask, on_label, on_mask, False, with_(cfg, mixing=False), NUM_CLASSES)
    assert torch.equal(off["images"], images) and torch.equal(off["target"], off_label)
    assert torch.equal(off["mask"], off_mask) and off["band"].abs().sum() == 0


def test_odd_batch_rejected(method_cfg):
    images, off_label, off_mask, on_label, on_mask = make_batch(b=3)
    with pytest.raises(ValueError, match="even"):
        mix_batch(images, off_label, off_mask, on_label, on_mask, False, method_cfg, NUM_CLASSES)

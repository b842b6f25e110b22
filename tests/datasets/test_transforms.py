"""Statistics of the faithful train transform (spec second-stage §2) and the val transform."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.transforms import TrainTransform, ValTransform, random_resized_crop_box
from tests.conftest import tiny_config


def test_crop_box_area_and_aspect_ranges():
    rng = random.Random(0)
    h, w = 300, 400
    areas, ratios = [], []
    for _ in range(4000):
        top, left, ch, cw = random_resized_crop_box(h, w, (0.5, 0.75), (3 / 4, 4 / 3), 10, rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        areas.append(ch * cw / (h * w))
        ratios.append(cw / ch)
    areas, ratios = np.array(areas), np.array(ratios)
    # Rounding the sides to integers moves the area and ratio by a fraction of a pixel.
    assert areas.min() > 0.5 - 0.01 and areas.max() < 0.75 + 0.01
    assert ratios.min() > 0.75 - 0.01 and ratios.max() < 4 / 3 + 0.01
    # On a square image every draw fits (no rejection), so the area is exactly uniform
    # (mean 0.625) and the ratio log-uniform (mean log ratio 0).
    sq = np.array([random_resized_crop_box(400, 400, (0.5, 0.75), (3 / 4, 4 / 3), 10, rng) for _ in range(4000)])
    assert abs((sq[:, 2] * sq[:, 3] / 400 ** 2).mean() - 0.625) < 0.005
    assert abs(np.log(sq[:, 3] / sq[:, 2]).mean()) < 0.01
    # On a 3:4 image tall wide-area draws get rejected, which shifts the mean area down.
    assert areas.mean() < 0.625
    # Only the first two scale entries matter (QUIRK): no crop is larger than 0.76 of the image.
    assert (areas > 0.76).sum() == 0


def test_crop_box_falls_back_to_centre_crop_when_no_try_fits():
    # A 10x1000 strip cannot host a crop of aspect <= 4/3 with half its area: centred fallback.
    top, left, h, w = random_resized_crop_box(10, 1000, (0.5, 0.75), (3 / 4, 4 / 3), 10, random.Random(0))
    assert (h, w) == (10, round(10 * 4 / 3))
    assert (top, left) == (0, (1000 - w) // 2)


def _coordinate_sample(h=60, w=80):
    """Image, label and mask that all encode the column, so any flip or crop shows in all three."""
    cols = np.tile(np.arange(w), (h, 1))
    image = np.stack([cols * 3, np.zeros_like(cols), np.full_like(cols, 128)], -1).astype(np.uint8)
    label = (cols * 4 // w).astype(np.uint8)          # 4 vertical bands 0..3
    mask = (cols < w // 2).astype(np.uint8)           # left half reliable
    return Image.fromarray(image), Image.fromarray(label, mode="L"), Image.fromarray(mask, mode="L")


@pytest.mark.parametrize("mode", ["rrc", "jitter"])
def test_train_transform_shapes_nearest_and_joint_flip(tmp_path, mode):
    cfg = tiny_config(tmp_path, f"data.scale_mode={mode}")
    t = TrainTransform(cfg.data)
    image, label, mask = _coordinate_sample()
    rng = random.Random(1)
    flips = 0
    for _ in range(60):
        img_t, lab_t, mask_t = t(image, label, mask, rng)
        assert img_t.shape == (3, 32, 32) and img_t.dtype == torch.float32
        assert lab_t.shape == (32, 32) and lab_t.dtype == torch.int64
        assert mask_t.shape == (32, 32) and mask_t.dtype == torch.int64
        # Nearest: no invented values (255 only from jitter padding).
        assert set(lab_t.unique().tolist()) <= {0, 1, 2, 3, 255}
        assert set(mask_t.unique().tolist()) <= {0, 1}
        # Undo the normalisation of channel 0 to read the column back.
        red = img_t[0] * cfg.data.std[0] + cfg.data.mean[0]
        valid = lab_t != 255
        col_trend = np.sign(np.corrcoef(red[valid].numpy().ravel(), np.tile(np.arange(32), (32, 1))[valid.numpy()])[0, 1])
        row = lab_t[0][lab_t[0] != 255].numpy().astype(int)
        lab_trend = np.sign(np.diff(row).sum()) if row.size > 1 else 0
        flipped = col_trend < 0
        flips += flipped
        # Label and mask flipped exactly when the image was: labels decrease left-to-right iff flipped.
        if lab_trend != 0:
            assert (lab_trend < 0) == flipped
        # The reliable (left) half of the original is where the small columns are.
        if 0 < mask_t.float().mean() < 1:
            left_cols = torch.nonzero(mask_t)[:, 1].float().mean()
            unreliable_cols = torch.nonzero(mask_t == 0)[:, 1].float().mean()
            assert (left_cols > unreliable_cols) == flipped
    assert 15 < flips < 45  # p = 0.5


def test_rrc_crop_area_shows_in_the_label(tmp_path):
    """A crop covers 50-75 % of the area: the 4 label bands are never all squeezed into a tiny box."""
    cfg = tiny_config(tmp_path)
    t = TrainTransform(cfg.data)
    image, label, mask = _coordinate_sample(64, 64)
    rng = random.Random(3)
    for _ in range(50):
        _, lab_t, _ = t(image, label, mask, rng)
        # 16 columns per band; crop width >= sqrt(0.5*0.75)*64 = 39 columns -> at least 2 bands.
        assert len(lab_t.unique()) >= 2


def test_val_transform_resizes_to_square_with_nearest_labels(tmp_path):
    cfg = tiny_config(tmp_path)
    image, label, _ = _coordinate_sample(45, 70)
    img_t, lab_t = ValTransform(cfg.data)(image, label)
    assert img_t.shape == (3, 32, 32) and lab_t.shape == (32, 32)
    assert set(lab_t.unique().tolist()) == {0, 1, 2, 3}
    assert (np.diff(lab_t.numpy(), axis=1) >= 0).all()  # no flip in validation
    # Normalised with ImageNet statistics: channel 2 is the constant 128.
    expected = (128 / 255 - cfg.data.mean[2]) / cfg.data.std[2]
    assert torch.allclose(img_t[2], torch.full((32, 32), expected), atol=1e-5)
    img_only, none = ValTransform(cfg.data)(image, None)
    assert none is None and torch.equal(img_only, img_t)

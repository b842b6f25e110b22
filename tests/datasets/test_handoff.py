"""datasets/handoff.py: the one confidence-mask rule, mask precision and the hand-off folder names.

The rule is checked against a plain formulation of first-stage spec §14 written here, pixel
by pixel; precision against counts made by hand; the names against the reference's and the
second stage's config.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datasets.handoff import (MASK_DIR, PSEUDO_LABEL_DIR, confidence_mask, keep_most_confident, mask_precision,
                              no_class_mask, precision_counts, random_keep, save_mask)
from datasets.synthetic.voc import simulated_mask

REPO = Path(__file__).resolve().parents[2]


def spec_mask(score: np.ndarray, pred: np.ndarray, thd: float) -> list[list[int]]:
    """First-stage spec §14, steps 1–6, one pixel at a time (ties: earlier row-major pixel first)."""
    k, h, w = score.shape
    margin = {}
    for y in range(h):
        for x in range(w):
            values = [float(score[i, y, x]) for i in range(k)]
            top1 = max(values)
            rest = [0.0 if v == top1 else v for v in values]  # step 2: zero every entry equal to top-1
            margin[y, x] = top1 - max(rest)
    mask = [[0] * w for _ in range(h)]
    for c in sorted({int(v) for v in pred.ravel()}):
        pixels = [(y, x) for y in range(h) for x in range(w) if pred[y, x] == c]  # row-major
        ranked = sorted(pixels, key=lambda p: -margin[p])  # Python's sort is stable
        for y, x in ranked[: math.floor(len(pixels) / (1 / thd))]:
            mask[y][x] = 1
    return mask


@pytest.mark.parametrize("thd", [0.5, 0.3, 1.0])
def test_rule_matches_the_spec_written_plainly(thd):
    rng = np.random.default_rng(7)
    # Coarse values: ties in the top-1 (QUIRK-13) and between margins (QUIRK-14).
    score = (np.round(rng.random((3, 5, 6)) * 4) / 4).astype(np.float32)
    keys = np.array([0, 4, 9])
    pred = keys[score.argmax(0)]
    assert len(np.unique(pred)) == 3
    got = confidence_mask(torch.from_numpy(score), pred, thd, "original")
    assert got.dtype == np.uint8 and got.tolist() == spec_mask(score, pred, thd)


def test_rule_on_a_hand_example():
    # One class region of 4 pixels with margins 0.1, 0.3, 0.3, 0.2 keeps the two 0.3 pixels; a
    # region of one pixel keeps nothing; ties go to the earlier pixel.
    score = np.array([[0.1, 0.3, 0.3, 0.2, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5]])
    label = np.array([[1, 1, 1, 1, 2], [3, 3, 3, 3, 3]])
    assert keep_most_confident(score, label, 0.5).tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_synthetic_masks_apply_the_same_rule():
    label = np.zeros((40, 48), np.uint8)
    label[8:30, 10:35] = 3
    label[20:38, 30:46] = 7
    mask = simulated_mask(np.random.default_rng(0), label, 0.5, 0.5)
    assert set(np.unique(mask)) == {0, 255}
    for c in (0, 3, 7):
        assert int((mask[label == c] > 0).sum()) == int((label == c).sum()) // 2
    # The COCO generator's empty images and the first stage's no-class masks: keep_count of all pixels.
    assert int(random_keep(np.random.default_rng(1), (5, 7), 0.5).sum()) == 35 // 2
    assert int(no_class_mask((5, 7), "x", seed=0, mode="random_half", thd=0.5).sum()) == 35 // 2


def test_precision_equals_a_hand_count(tmp_path):
    label = np.array([[1, 1, 2], [0, 2, 2]])
    gt = np.array([[1, 2, 2], [0, 255, 1]])
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    valid = gt != 255
    # kept and valid: (0,0) right, (0,1) wrong, (1,2) wrong -> 1 of 3; unkept and valid:
    # (0,2) right, (1,0) right -> 2 of 2; (1,1) is void.
    counts = precision_counts(label, mask, gt, valid)
    assert counts == {"kept_valid": 3, "kept_correct": 1, "unkept_valid": 2, "unkept_correct": 2}
    assert mask_precision(counts) == {"kept_precision": 1 / 3, "unkept_precision": 1.0}
    none = {"kept_valid": 0, "kept_correct": 0, "unkept_valid": 0, "unkept_correct": 0}
    assert mask_precision(none) == {"kept_precision": None, "unkept_precision": None}
    assert mask_precision(none, empty=0.0) == {"kept_precision": 0.0, "unkept_precision": 0.0}
    # The saved file (RGB, 0/255) gives the same counts.
    with Image.open(save_mask(tmp_path / "m.png", mask)) as img:
        assert img.mode == "RGB"
        assert precision_counts(label, np.asarray(img)[..., 0], gt, valid) == counts


def test_names_are_the_references_and_the_second_stage_default():
    assert (PSEUDO_LABEL_DIR, MASK_DIR) == ("irn_pseudo_label", "irn_mask")
    # The second stage's defaults live in its config (the dataclasses hold no values); they must
    # name the folders the first stage's export and the generators write.
    common = yaml.safe_load((REPO / "configs" / "data" / "common.yaml").read_text())
    assert (common["pseudo_label_dir"], common["mask_dir"]) == (PSEUDO_LABEL_DIR, MASK_DIR)

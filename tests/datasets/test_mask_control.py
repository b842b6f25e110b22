"""The controlled mask generator hits its kept share and precisions within its stated tolerance
(one pixel's share of each side), in both shapes, and refuses what a label set cannot reach
(issue 26)."""
from __future__ import annotations

import numpy as np
import pytest

from datasets.synthetic.label_noise import boundary_errors
from datasets.synthetic.mask_control import class_counts, controlled_masks, kept_counts, mask_figures
from utils.errors import ConfigError, DataError
from tests.datasets.test_label_noise import scenes


def noisy_set():
    gts = scenes(n=8, seed=4)
    labels, _ = boundary_errors(gts, 0.08, 5.0, cell=10.0, seed=2)
    # Region errors too, so that wrong pixels also lie far from the label's boundaries.
    for i, label in enumerate(labels):
        if i % 3 == 0:
            label[:16, :16] = 3
    return labels, gts


def within_tolerance(figures: dict, targets: dict) -> None:
    kept, dropped = figures["kept_valid"], figures["unkept_valid"]
    tol = {"kept_share": 1 / (kept + dropped), "kept_precision": 1 / kept, "dropped_precision": 1 / dropped}
    for key, target in targets.items():
        assert abs(figures[key] - target) <= tol[key], (key, figures[key], target)


def test_hand_made_set_reaches_exact_counts():
    gt = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [255, 255, 2, 2]], np.uint8)
    label = np.array([[1, 1, 1, 0], [0, 0, 2, 2], [1, 1, 2, 1]], np.uint8)
    # 10 valid pixels: 6 right, 4 wrong. Keep half at precision 0.8: 4 right and 1 wrong kept;
    # dropped: 2 right of 5 (0.4), and 1 of the 2 void pixels kept (half of them).
    masks, fig = controlled_masks([label], [gt], kept_share=0.5, kept_precision=0.8, seed=1)
    assert (fig["kept_valid"], fig["kept_correct"], fig["unkept_valid"], fig["unkept_correct"]) == (5, 4, 5, 2)
    assert fig["kept_share"] == 0.5 and fig["kept_precision"] == 0.8 and fig["dropped_precision"] == 0.4
    assert int(masks[0][gt == 255].sum()) == 1 and masks[0].dtype == np.uint8 and set(np.unique(masks[0])) <= {0, 1}
    assert kept_counts(6, 4, kept_precision=0.8, dropped_precision=0.4) == (4, 1)
    assert kept_counts(6, 4, kept_share=0.5, dropped_precision=0.4) == (4, 1)


@pytest.mark.parametrize("shape", ["random", "boundary"])
@pytest.mark.parametrize("targets", [{"kept_precision": 0.95, "dropped_precision": 0.75},
                                     {"kept_share": 0.5, "kept_precision": 0.99},
                                     {"kept_share": 0.7, "dropped_precision": 0.75}])
def test_synthetic_set_hits_targets(shape, targets):
    labels, gts = noisy_set()
    masks, fig = controlled_masks(labels, gts, shape=shape, seed=3, **targets)
    within_tolerance(fig, targets)
    assert fig == mask_figures(labels, masks, gts)  # reported = measured
    # The third figure follows from the label set's precision.
    right = fig["kept_correct"] + fig["unkept_correct"]
    assert fig["kept_share"] * fig["kept_precision"] + (1 - fig["kept_share"]) * fig["dropped_precision"] \
        == pytest.approx(right / (fig["kept_valid"] + fig["unkept_valid"]))


def test_boundary_shape_drops_pixels_nearer_the_boundary():
    labels, gts = noisy_set()
    targets = {"kept_share": 0.5, "kept_precision": 0.97}
    _, rand = controlled_masks(labels, gts, shape="random", seed=0, **targets)
    _, bound = controlled_masks(labels, gts, shape="boundary", seed=0, **targets)
    assert bound["dropped_boundary_distance"] < 0.6 * rand["dropped_boundary_distance"]


def test_unreachable_targets_are_refused_with_the_range():
    labels, gts = noisy_set()
    fig = mask_figures(labels, [np.ones_like(label) for label in labels], gts)
    overall = fig["kept_precision"]
    with pytest.raises(DataError, match=rf"kept precision 0.5 and dropped precision 0.4 are unreachable: "
                                        rf"the label set is {overall:.4f} correct"):
        controlled_masks(labels, gts, kept_precision=0.5, dropped_precision=0.4)
    # Keeping 99 % of pixels at precision 0.999 needs more right pixels than there are.
    with pytest.raises(DataError, match=r"kept precision 0.999 is unreachable at kept share 0.99.* reachable "
                                        r"0\.\d{4} to 0\.\d{4}"):
        controlled_masks(labels, gts, kept_share=0.99, kept_precision=0.999)
    with pytest.raises(ConfigError, match="give exactly two"):
        controlled_masks(labels, gts, kept_share=0.5, kept_precision=0.9, dropped_precision=0.5)
    with pytest.raises(ConfigError, match="shape"):
        controlled_masks(labels, gts, kept_share=0.5, kept_precision=0.9, shape="blob")


def test_same_seed_same_masks():
    labels, gts = noisy_set()
    for shape in ("random", "boundary"):
        a, _ = controlled_masks(labels, gts, kept_share=0.5, kept_precision=0.9, shape=shape, seed=7)
        b, _ = controlled_masks(labels, gts, kept_share=0.5, kept_precision=0.9, shape=shape, seed=7)
        c, _ = controlled_masks(labels, gts, kept_share=0.5, kept_precision=0.9, shape=shape, seed=8)
        assert all((x == y).all() for x, y in zip(a, b))
        assert any((x != y).any() for x, y in zip(a, c))


def test_class_counts_split_the_kept_pixels_by_hand():
    # The hand-made set's classes 0, 1, 2: right 2, 3, 1 and wrong 1, 1, 2 valid pixels. 4 right
    # kept: 4/6 of each class's, 1.33, 2, 0.67 -> 1, 2, 1 (the largest remainder gets the spare
    # pixel); 1 wrong kept: 0.25, 0.25, 0.5 -> 0, 0, 1.
    right, wrong = class_counts([2, 3, 1], [1, 1, 2], 4, 1)
    assert right.tolist() == [1, 2, 1] and wrong.tolist() == [0, 0, 1]
    # Equal remainders go to the lower class; the totals are exact.
    right, wrong = class_counts([1, 1, 1, 1], [0, 5, 0, 5], 2, 5)
    assert right.tolist() == [1, 1, 0, 0] and wrong.tolist() == [0, 3, 0, 2]


@pytest.mark.parametrize("shape", ["random", "boundary"])
def test_every_pseudo_label_class_keeps_the_same_share_of_its_right_and_of_its_wrong_pixels(shape):
    """The set-wide boundary ranking this replaced kept 7 % of a foreground class's pixels and 63 %
    of the background's at a kept share of 0.47."""
    labels, gts = noisy_set()
    targets = {"kept_precision": 0.95, "dropped_precision": 0.6}
    masks, fig = controlled_masks(labels, gts, shape=shape, seed=3, **targets)
    within_tolerance(fig, targets)
    label, mask, gt = (np.concatenate([a.reshape(-1) for a in x]) for x in (labels, masks, gts))
    ok = gt != 255
    right_share = fig["kept_correct"] / (fig["kept_correct"] + fig["unkept_correct"])
    wrong_kept = fig["kept_valid"] - fig["kept_correct"]
    wrong_share = wrong_kept / (wrong_kept + fig["unkept_valid"] - fig["unkept_correct"])
    for c in np.unique(label):
        for pool, share in ((ok & (label == c) & (label == gt), right_share), (ok & (label == c) & (label != gt), wrong_share)):
            assert abs(int(mask[pool].sum()) - share * int(pool.sum())) <= 1, c

"""Confidence masks of a chosen quality, for the mask study (tools/mask_study.py, issue 26).

From a pseudo-label set and its ground truth, masks whose kept share and label precision on
kept and on dropped pixels are set, reached by choosing which right and which wrong pixels to
keep. Every figure is a set-level share over the non-void ground-truth pixels (GT 255 is in no
count), as datasets/handoff.py's ``precision_counts`` counts them.

Only two of the three figures are free: with R right pixels among N,
``kept_share · kept_precision + (1 − kept_share) · dropped_precision = R / N`` (every pixel is
kept or dropped). So a mask is asked for by two of them and the third follows; targets no split
of this label set can reach are refused, naming the reachable range, before any mask is made.

Every pseudo-label class keeps the same share of its right pixels and the same share of its
wrong ones (to whole pixels, ``class_counts``): the mask is as good in every class as over the
set, and no class loses its supervision to the ranking. Without this, the boundary shape ranked
pixels over the whole set; at a kept share of 0.47 it kept 7-10 % of the small foreground
classes' pixels and most of the background's, and BECO trained on it fell to 13 % mIoU: the map
measured starved classes, not the mask's precision. (The same kept share in every class, as the
first stage's own masks keep, is not asked for: on the study's labels a class whose pseudo-label
is 84 % wrong then bounds the kept precision below 0.87 at every kept share of the grid.)

Shapes (which pixels of each class's right and wrong pools are kept):
- ``random``: drawn at random;
- ``boundary``: the pixels farthest from the pseudo-label's own class boundaries are kept, so the
  dropped ones are those nearest a boundary, as a first stage's margin-ranked mask drops them.
  Equal distances are ordered by a seeded random key.
GT-void pixels (in no count, but trained on through their pseudo-label) are kept at their class's
share, chosen by the same shape.

Tolerance: kept counts are whole pixels, each within half a pixel of the exact solution, so the
reached kept share is within 1/N of its target and each precision within one pixel's share of
its side (1/kept pixels, 1/dropped pixels) of its target.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from datasets.handoff import mask_precision, precision_counts
from utils.errors import ConfigError, DataError
from utils.voc import IGNORE_INDEX

SHAPES = ("random", "boundary")
TARGETS = ("kept_share", "kept_precision", "dropped_precision")
# Raised whenever the same targets, shape and seed give other masks, so that a mask folder made
# by an earlier generator is refused (tools/mask_study.py records it), never reused.
# 2: the kept right and wrong pixels are split over the pseudo-label classes (class_counts).
GENERATOR_VERSION = 2


def boundary_distance(label: np.ndarray) -> np.ndarray:
    """(H, W) float32: each pixel's distance in px to the nearest class boundary of ``label``
    (a label of one class everywhere: all pixels equally far, +inf)."""
    k = np.ones((3, 3), np.uint8)
    boundary = cv2.dilate(label, k) != cv2.erode(label, k)
    if not boundary.any():
        return np.full(label.shape, np.inf, np.float32)
    return cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, 5)


def pool_sizes(labels: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> tuple[int, int]:
    """(right, wrong): non-void ground-truth pixels whose label equals / differs from it."""
    right = wrong = 0
    for label, gt in zip(labels, gts):
        ok = gt != IGNORE_INDEX
        same = ok & (label == gt)
        right += int(same.sum())
        wrong += int(ok.sum()) - int(same.sum())
    return right, wrong


def kept_counts(right: int, wrong: int, kept_share: float | None = None, kept_precision: float | None = None,
                dropped_precision: float | None = None) -> tuple[int, int]:
    """(right pixels kept, wrong pixels kept) for two of the three targets; raises ConfigError
    (not two targets, or out of [0, 1]) or DataError (unreachable on this label set, with the
    reachable range)."""
    given = {k: v for k, v in zip(TARGETS, (kept_share, kept_precision, dropped_precision)) if v is not None}
    if len(given) != 2:
        raise ConfigError(f"give exactly two of {TARGETS} (the third follows from the label set's precision), "
                          f"got {sorted(given) or 'none'}")
    bad = {k: v for k, v in given.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ConfigError(f"mask targets must lie in [0, 1], got {bad}")
    n = right + wrong
    if n == 0:
        raise DataError("the label set has no pixel with a non-void ground truth")
    overall = right / n
    if kept_share is None:
        # s·kp + (1 − s)·dp = overall: the share follows, if overall lies between the two.
        kp, dp = kept_precision, dropped_precision
        if not (min(kp, dp) <= overall <= max(kp, dp)) or (kp == dp and kp != overall):
            raise DataError(f"kept precision {kp} and dropped precision {dp} are unreachable: the label set is "
                            f"{overall:.4f} correct ({right} of {n} pixels), so one of them must be at least and the "
                            f"other at most {overall:.4f}")
        if kp == dp:
            raise DataError(f"kept and dropped precision both {kp}: any kept share reaches them; give the share")
        kept_share = (overall - dp) / (kp - dp)
    kept = int(round(kept_share * n))
    if kept_precision is None:
        kept_right = right - int(round(dropped_precision * (n - kept)))
    else:
        kept_right = int(round(kept_precision * kept))
    # Whatever the two targets, the kept pixels are kept_right right and the rest wrong ones.
    lo, hi = max(0, kept - wrong), min(right, kept)
    if not lo <= kept_right <= hi:
        what = "kept" if kept_precision is not None else "dropped"
        side = kept if what == "kept" else n - kept

        def precision(kr: int) -> float:
            return (kr if what == "kept" else right - kr) / side
        reach = sorted((precision(lo), precision(hi)))
        raise DataError(f"{what} precision {given[what + '_precision']} is unreachable at kept share "
                        f"{kept / n:.4f} on this label set ({right} right, {wrong} wrong pixels): "
                        f"reachable {reach[0]:.4f} to {reach[1]:.4f}")
    return kept_right, kept - kept_right


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Whole numbers proportional to ``weights`` that sum to ``total`` (ties to the lower index)."""
    if total == 0 or weights.sum() == 0:
        return np.zeros(weights.size, np.int64)
    quota = total * weights / weights.sum()
    out = np.floor(quota).astype(np.int64)
    extra = total - int(out.sum())
    out[np.argsort(-(quota - out), kind="stable")[:extra]] += 1
    return out


def class_counts(right: Sequence[int], wrong: Sequence[int], kept_right: int,
                 kept_wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``kept_right`` and ``kept_wrong`` over classes with ``right`` / ``wrong`` pixels each, in
    proportion to them (largest remainder: each total exact, each class within one pixel): every
    class keeps the same share of its right pixels and the same share of its wrong ones."""
    return (_largest_remainder(kept_right, np.asarray(right, np.int64)),
            _largest_remainder(kept_wrong, np.asarray(wrong, np.int64)))


def _choose(rng: np.random.Generator, distance: np.ndarray, count: int, shape: str) -> np.ndarray:
    """Indices of the ``count`` pixels of a pool to keep (``distance`` of each to a boundary)."""
    key = rng.random(distance.size)  # drawn for both shapes, so the seed's stream does not depend on it
    if shape == "random":
        order = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((key, -distance))  # farthest first, ties in random order
    return order[:count]


def controlled_masks(labels: Sequence[np.ndarray], gts: Sequence[np.ndarray], *, kept_share: float | None = None,
                     kept_precision: float | None = None, dropped_precision: float | None = None,
                     shape: str = "random", seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """Masks ((H, W) uint8, 1 = kept) for ``labels`` with two of the three set-level targets
    reached (module docstring: shapes, tolerance); returns (masks, figures reached): kept_share,
    kept_precision, dropped_precision (datasets/handoff's ``mask_precision``; its ``unkept`` is
    our dropped), their pixel counts, and the mean distance of dropped valid pixels to the
    pseudo-label's boundary (px)."""
    if shape not in SHAPES:
        raise ConfigError(f"mask shape must be one of {SHAPES}, got {shape!r}")
    if len(labels) != len(gts):
        raise DataError(f"{len(labels)} pseudo-labels but {len(gts)} ground truths")
    for i, (label, gt) in enumerate(zip(labels, gts)):
        if label.shape != gt.shape:
            raise DataError(f"image {i}: pseudo-label {label.shape} and ground truth {gt.shape} differ in size")
    right, wrong = pool_sizes(labels, gts)
    kept_right, kept_wrong = kept_counts(right, wrong, kept_share, kept_precision, dropped_precision)
    rng = np.random.default_rng(seed)
    distances = [boundary_distance(np.ascontiguousarray(label, np.uint8)) for label in labels]
    # Each pool over the whole set, as indices into the set's pixels laid end to end.
    offsets = np.cumsum([0] + [label.size for label in labels])
    every = np.zeros(int(offsets[-1]), np.uint8)
    whole_gt = np.concatenate([gt.reshape(-1) for gt in gts]) if gts else np.zeros(0, np.uint8)
    whole_label = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels]) if labels else whole_gt
    whole_dist = np.concatenate([d.reshape(-1) for d in distances]) if labels else np.zeros(0, np.float32)
    ok = whole_gt != IGNORE_INDEX
    is_right, is_wrong = ok & (whole_label == whole_gt), ok & (whole_label != whole_gt)
    per_class = [whole_label == c for c in np.unique(whole_label)]
    right_c, wrong_c = class_counts([int((is_right & c).sum()) for c in per_class],
                                    [int((is_wrong & c).sum()) for c in per_class], kept_right, kept_wrong)
    set_share = (kept_right + kept_wrong) / (right + wrong)
    for in_class, kr, kw in zip(per_class, right_c, wrong_c):
        n_valid = int((ok & in_class).sum())
        void = ~ok & in_class
        kept_void = int(round((kr + kw) / n_valid * int(void.sum()) if n_valid else set_share * int(void.sum())))
        for pool, count in ((is_right & in_class, kr), (is_wrong & in_class, kw), (void, kept_void)):
            index = np.flatnonzero(pool)
            every[index[_choose(rng, whole_dist[index], int(count), shape)]] = 1
    masks = [every[offsets[i]:offsets[i + 1]].reshape(label.shape) for i, label in enumerate(labels)]
    return masks, mask_figures(labels, masks, gts)


def mask_figures(labels: Sequence[np.ndarray], masks: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict:
    """The figures a mask set reaches on its labels: kept share, kept and dropped precision (over
    non-void GT pixels, summed over the set), their counts, and the mean distance (px) of the
    dropped valid pixels to the pseudo-label's boundaries. Works on any masks (non-zero = kept):
    the first stage's own are measured with it."""
    totals = dict.fromkeys(("kept_valid", "kept_correct", "unkept_valid", "unkept_correct"), 0)
    dist_sum = 0.0
    for label, mask, gt in zip(labels, masks, gts):
        valid = gt != IGNORE_INDEX
        for k, v in precision_counts(label, mask, gt, valid).items():
            totals[k] += v
        dropped = valid & (np.asarray(mask) == 0)
        d = boundary_distance(np.ascontiguousarray(label, np.uint8))[dropped]
        dist_sum += float(np.where(np.isfinite(d), d, 0.0).sum())
    precision = mask_precision(totals)
    n = totals["kept_valid"] + totals["unkept_valid"]
    return {"kept_share": totals["kept_valid"] / n if n else None, "kept_precision": precision["kept_precision"],
            "dropped_precision": precision["unkept_precision"], **totals,
            "dropped_boundary_distance": dist_sum / totals["unkept_valid"] if totals["unkept_valid"] else None}

"""Pseudo-labels with controlled errors, for the label-noise study (tools/noise_study.py).

From a ground truth, two kinds of error at a chosen pixel error rate:
- boundary errors: every outline displaced by a smooth random field of at most ``band`` px,
  so a wrong pixel always lies within ``band`` px of a true boundary;
- region errors: false blobs, missed objects and class swaps, made only farther than
  ``band`` px from every true boundary.
The error rate is the share of non-void ground-truth pixels whose label is wrong, over the
whole set; each generator reaches the target by one global knob (the field's amplitude) or
by adding errors until it is reached. The void band of the ground truth (255) takes the
nearest class, as a first stage's labels have no void.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from datasets.synthetic.voc import near_boundary, smooth_field
from utils.voc import IGNORE_INDEX


def error_counts(labels: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> tuple[int, int]:
    """(wrong, valid): pixels whose label differs from a non-void ground truth, and those pixels."""
    wrong = valid = 0
    for label, gt in zip(labels, gts):
        ok = gt != IGNORE_INDEX
        valid += int(ok.sum())
        wrong += int((ok & (label != gt)).sum())
    return wrong, valid


def error_rate(labels: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    wrong, valid = error_counts(labels, gts)
    return wrong / max(valid, 1)


def fill_void(gt: np.ndarray) -> np.ndarray:
    """The ground truth with each void pixel given the class of the nearest non-void pixel."""
    if not (gt == IGNORE_INDEX).any():
        return gt.copy()
    classes = [c for c in np.unique(gt) if c != IGNORE_INDEX]
    if not classes:
        return np.zeros_like(gt)
    dist = np.stack([cv2.distanceTransform((gt != c).astype(np.uint8), cv2.DIST_L2, 5) for c in classes])
    return np.where(gt == IGNORE_INDEX, np.asarray(classes, gt.dtype)[dist.argmin(0)], gt)


# ----------------------------------------------------------------------------- boundary errors

def _signed_distances(filled: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(K, H, W): for each class, the distance to its region (negative outside, positive inside)."""
    out = []
    for c in classes:
        inside = (filled == c).astype(np.uint8)
        out.append(cv2.distanceTransform(inside, cv2.DIST_L2, 5) - cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5))
    return np.stack(out).astype(np.float32)


def displace(filled: np.ndarray, sdf: np.ndarray, classes: Sequence[int], field: np.ndarray, amplitude: float,
             band: float) -> np.ndarray:
    """Objects grown or shrunk by a smooth offset of at most ``band`` px: a pixel takes the
    class maximising signed distance + offset, the offset being +o for the foreground classes
    and −o for the background, o = band·clip(amplitude·field, −1, 1). An object's outline
    on the background moves by o (out where o > 0, in where o < 0), so never more than
    ``band`` px, and a pixel farther than that from every boundary keeps its class; outlines
    between two objects stay (o cancels)."""
    o = band * np.clip(amplitude * field, -1.0, 1.0)
    sign = np.where(np.asarray(classes) == 0, -1.0, 1.0).astype(np.float32)[:, None, None]
    return np.asarray(classes, filled.dtype)[(sdf + sign * o[None]).argmax(0)]


def boundary_errors(gts: Sequence[np.ndarray], target: float, band: float, cell: float, seed: int,
                    tolerance: float = 0.002) -> tuple[list[np.ndarray], float]:
    """Labels with displaced outlines whose set-level error rate is ``target`` (± ``tolerance``)
    if the band allows it, else as close as the band allows; returns (labels, rate reached).
    One amplitude for the whole set, found by bisection, so every image's outlines move
    by the same rule; the offsets are smooth fields with features about ``cell`` px apart."""
    rng = np.random.default_rng(seed)
    prepared = []
    for gt in gts:
        filled = fill_void(gt)
        classes = [int(c) for c in np.unique(filled)]
        h, w = gt.shape
        fields = smooth_field(rng, h, w, cell)
        prepared.append((filled, _signed_distances(filled, classes), classes, fields))

    def make(amplitude: float) -> list[np.ndarray]:
        return [displace(f, sdf, cl, fl, amplitude, band) for f, sdf, cl, fl in prepared]

    lo, hi = 0.0, 64.0
    best = make(hi)
    if error_rate(best, gts) <= target:
        return best, error_rate(best, gts)
    for _ in range(40):
        mid = (lo + hi) / 2
        labels = make(mid)
        rate = error_rate(labels, gts)
        if abs(rate - target) <= tolerance:
            return labels, rate
        lo, hi = (mid, hi) if rate < target else (lo, mid)
        best = labels
    return best, error_rate(best, gts)


# ----------------------------------------------------------------------------- region errors

REGION_KINDS = ("false_blob", "missed_object", "class_swap")


def _objects(label: np.ndarray) -> list[np.ndarray]:
    """The label's foreground connected components, as boolean masks."""
    out = []
    for c in np.unique(label):
        if c == 0 or c == IGNORE_INDEX:
            continue
        n, comp = cv2.connectedComponents((label == c).astype(np.uint8), connectivity=8)
        out += [comp == k for k in range(1, n)]
    return out


def _blob(rng: np.random.Generator, shape: tuple[int, int], radius: float, cell: float) -> np.ndarray:
    """A blob of about ``radius`` px with a wobbly outline, anywhere in the image."""
    h, w = shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = radius * rng.uniform(0.6, 1.4), radius * rng.uniform(0.6, 1.4)
    theta = rng.uniform(0, np.pi)
    u = (gx - cx) * np.cos(theta) + (gy - cy) * np.sin(theta)
    v = -(gx - cx) * np.sin(theta) + (gy - cy) * np.cos(theta)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2) + 0.15 * smooth_field(rng, h, w, cell) < 1.0


def region_errors(gts: Sequence[np.ndarray], target: float, band: float, num_classes: int, seed: int,
                  blob_radius: Sequence[float] = (6.0, 16.0), cell: float = 8.0,
                  kinds: Sequence[str] = REGION_KINDS) -> tuple[list[np.ndarray], float, dict[str, int]]:
    """Labels with whole-region errors, never within ``band`` px of a true boundary, added
    one at a time on random images until the set's error rate reaches ``target``; returns
    (labels, rate reached, how many errors of each kind). A false blob is a foreground class
    painted where it is not; a missed object's inside becomes background; a class swap gives
    an object's inside another foreground class."""
    rng = np.random.default_rng(seed)
    labels = [fill_void(gt) for gt in gts]
    editable = [~near_boundary(gt, band) & (gt != IGNORE_INDEX) for gt in gts]
    objects = [_objects(gt) for gt in gts]
    wrong, valid = error_counts(labels, gts)
    counts = {k: 0 for k in kinds}
    for _ in range(100 * len(gts)):
        if wrong >= target * valid:
            break
        i = int(rng.integers(0, len(gts)))
        gt, label, ok = gts[i], labels[i], editable[i]
        kind = kinds[int(rng.integers(0, len(kinds)))]
        if kind == "false_blob":
            region = _blob(rng, gt.shape, rng.uniform(*blob_radius), cell) & ok
            value = int(rng.integers(1, num_classes))
            region &= gt != value
        else:
            if not objects[i]:
                continue
            region = objects[i][int(rng.integers(0, len(objects[i])))] & ok
            value = 0 if kind == "missed_object" else int(rng.integers(1, num_classes))
            if kind == "class_swap" and region.any() and value == int(gt[region][0]):
                value = 1 + value % (num_classes - 1)  # another foreground class
        before = int((label[region] != gt[region]).sum())
        label[region] = value
        after = int((label[region] != gt[region]).sum())
        if after > before:
            counts[kind] += 1
        wrong += after - before
    return labels, wrong / max(valid, 1), counts

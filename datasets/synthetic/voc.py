"""A small synthetic PASCAL-VOC-format data set, with simulated first-stage outputs.

Without VOC and without network access the project still needs data that the real
loaders read unchanged and that is a segmentation problem worth solving. This module
writes, under ``out``:

    VOC2012/JPEGImages/<id>.jpg                   every id (train, val, test)
    VOC2012/Annotations/<id>.xml                  every id, VOC's XML format
    VOC2012/SegmentationClass/<id>.png            train and val: palette PNG, 0..K, 255 = void
    VOC2012/SegmentationClassAug/<id>.png         the same ground truth (what SBD would give)
    VOC2012/ImageSets/Segmentation/{train_aug,train,val,test}.txt
    irn_pseudo_label/<id>.png                     train_aug: simulated first-stage label (mode L)
    irn_mask/<id>.png                             train_aug: confidence mask, RGB 0/255 (gen_mask format)
    synthetic_voc.json                            settings and pseudo-label statistics

Scene design (why it is not trivial): backgrounds are cluttered with textured patches
and untextured distractor shapes; each of the K foreground classes is a fixed pair
(shape, texture) while colours are drawn per instance, so neither colour nor texture
alone identifies a class. Objects overlap (later over earlier) and get cut by the
image border; ground truth has VOC's void band along object outlines.

Pseudo-labels imitate CAM/IRN errors: smooth wobbly boundary shifts with a bias
towards spilling into the background, missed object parts, context distractors
labelled as the nearby object, occasionally a whole small object given another class
of the image or lost to background. Only classes of the image's label are ever used,
as the first stage's random walk does. Confidence masks apply the gen_mask rule
(first-stage spec §14) to a score = distance to the pseudo-label's class boundaries
plus a little noise, so the kept half of every class region is its interior.

Every random draw comes from numpy Generators seeded by (seed, image index, stream),
so the same arguments give the same bytes for every file.
"""
from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR, keep_most_confident, mask_precision, precision_counts, save_mask
from utils.errors import OutputExistsError
from utils.io import save_jpeg, save_json, save_png, save_text
from utils.metrics import confusion_matrix, segmentation_scores
from utils.voc import IGNORE_INDEX, VOC_CLASSES, voc_palette

# Bump when the generator's output changes for the same arguments: a stored data set
# made by another version then counts as "different settings".
GENERATOR_VERSION = 1
SUMMARY_NAME = "synthetic_voc.json"

# Foreground class k (1-based label id) is drawn as CLASS_STYLES[k - 1] = (shape, texture).
# Every shape is used with several textures and every texture on several shapes, so a
# model must combine both cues.
CLASS_STYLES: tuple[tuple[str, str], ...] = (
    ("ellipse", "stripes"), ("star", "checker"), ("ring", "grid"), ("rectangle", "dots"),
    ("blob", "noise"), ("triangle", "concentric"), ("cross", "stripes"), ("crescent", "dots"),
    ("ellipse", "checker"), ("star", "dots"), ("ring", "noise"), ("rectangle", "stripes"),
    ("blob", "checker"), ("triangle", "grid"), ("cross", "noise"), ("crescent", "waves"),
    ("ellipse", "grid"), ("star", "waves"), ("rectangle", "concentric"), ("blob", "waves"),
)
assert len(set(CLASS_STYLES)) == len(CLASS_STYLES) == len(VOC_CLASSES) - 1

_SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- ids


def synthetic_ids(train: int, val: int, test: int) -> dict[str, list[str]]:
    """VOC-like string ids, unique across splits: train, then val, then test."""
    names: dict[str, list[str]] = {}
    start = 0
    for split, n in zip(_SPLITS, (train, val, test)):
        names[split] = [_id_of(k) for k in range(start, start + n)]
        start += n
    return names


def _id_of(k: int) -> str:
    # VOC's "<year>_<6 digits>"; roll the year over so huge sets stay unique.
    return f"{2007 + k // 999_999}_{k % 999_999 + 1:06d}"


# ----------------------------------------------------------------------------- random fields


def smooth_field(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field whose features are about ``cell`` px apart."""
    gh = max(2, int(math.ceil(h / cell)) + 1)
    gw = max(2, int(math.ceil(w / cell)) + 1)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    f = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    f -= f.mean()
    return f / (f.std() + 1e-6)


def _unit(f: np.ndarray) -> np.ndarray:
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo + 1e-6)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _colour_pair(rng: np.random.Generator, min_dist: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart that a texture made of them stays visible."""
    a = _random_colour(rng)
    for _ in range(20):
        b = _random_colour(rng)
        if float(np.linalg.norm(a - b)) >= min_dist:
            break
    return a, b


COLOUR_MODES = ("instance", "class")


def _class_colour_pair(cls: int, rng: np.random.Generator, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour mode "class": class ``cls`` (1-based) has a fixed hue, bright and dark tone.

    Hues step by the golden angle so the first K classes are spread around the wheel
    whatever K is; ``jitter`` (per channel, 0..255 scale) varies each instance.
    """
    hue = ((cls - 1) * 0.381966) % 1.0
    light = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95), np.float32) * 255
    dark = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.45), np.float32) * 255
    shift = rng.uniform(-jitter, jitter, 3).astype(np.float32)
    return np.clip(light + shift, 0, 255), np.clip(dark + shift, 0, 255)


# ----------------------------------------------------------------------------- shapes and textures


def _local_coords(gx: np.ndarray, gy: np.ndarray, cx: float, cy: float, angle: float):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = gx - cx, gy - cy
    return dx * c + dy * s, -dx * s + dy * c


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a shape in its own rotated frame (u, v), size ``r`` (about its radius)."""
    rho = np.sqrt(u * u + v * v)
    if kind == "ellipse":
        b = r * rng.uniform(0.5, 0.8)
        return (u / r) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "ring":
        b = r * rng.uniform(0.75, 1.0)
        e = np.sqrt((u / r) ** 2 + (v / b) ** 2)
        return (e <= 1.0) & (e >= rng.uniform(0.45, 0.6))
    if kind == "rectangle":
        return (np.abs(u) <= r * 0.95) & (np.abs(v) <= r * rng.uniform(0.45, 0.8))
    if kind == "star":
        n = int(rng.integers(5, 8))
        inner = rng.uniform(0.4, 0.55)
        theta = np.arctan2(v, u)
        tri = np.abs(((theta * n / (2 * np.pi)) % 1.0) - 0.5) * 2.0  # 1 at spikes, 0 between
        return rho <= r * (inner + (1.0 - inner) * tri)
    if kind == "blob":
        theta = np.arctan2(v, u)
        radius = np.full_like(theta, 0.85)
        for k in (2, 3, 4):
            radius += rng.uniform(0.04, 0.14) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return rho <= r * radius
    if kind == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = k * 2 * np.pi / 3
            inside &= u * math.cos(a) + v * math.sin(a) <= r * 0.55
        return inside
    if kind == "cross":
        arm = r * rng.uniform(0.25, 0.38)
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    if kind == "crescent":
        shift = r * rng.uniform(0.4, 0.6)
        return (rho <= r) & ((u - shift) ** 2 + v ** 2 > (r * 0.8) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] between an instance's two colours."""
    period = rng.uniform(4.5, 7.0)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phase)
        return np.clip((t - 0.5) * 3.0 + 0.5, 0, 1)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        p = period + 1.0
        du = (u % p) - p / 2
        dv = (v % p) - p / 2
        return (du * du + dv * dv <= (0.3 * p) ** 2).astype(np.float32)
    if kind == "grid":
        p = period + 1.0
        return ((np.abs((u % p) - p / 2) < 0.8) | (np.abs((v % p) - p / 2) < 0.8)).astype(np.float32)
    if kind == "concentric":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * np.sqrt(u * u + v * v) / period + phase)
        return np.clip((t - 0.5) * 3.0 + 0.5, 0, 1)
    if kind == "waves":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 1.8 * np.sin(2 * np.pi * v / (2.5 * period))) / period + phase)
        return np.clip((t - 0.5) * 3.0 + 0.5, 0, 1)
    if kind == "noise":
        h, w = u.shape
        fine = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.0)
        return np.clip((_unit(fine) - 0.5) * 4.0 + 0.5, 0, 1)
    raise ValueError(f"unknown texture {kind!r}")


# ----------------------------------------------------------------------------- scene


def _background(rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cluttered background image (H, W, 3) float and the masks of its distractor shapes."""
    h, w = gx.shape
    angle = rng.uniform(0, 2 * np.pi)
    ramp = _unit(gx * math.cos(angle) + gy * math.sin(angle))[..., None]
    c0, c1 = _random_colour(rng), _random_colour(rng)
    img = c0 * (1 - ramp) + c1 * ramp
    # Large soft-edged patches of low-contrast "stuff" (grass, wall, water...): big and
    # faint enough that they do not pass for objects, busy enough that a flat-colour
    # rule cannot separate objects from background.
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        u, v = _local_coords(gx, gy, cx, cy, rng.uniform(0, np.pi))
        a, b = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        if rng.random() < 0.5:
            region = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        else:
            region = (np.abs(u) <= a) & (np.abs(v) <= b)
        alpha = cv2.GaussianBlur(region.astype(np.float32), (0, 0), rng.uniform(1.5, 4.0))[..., None]
        ca = _random_colour(rng)
        cb = np.clip(ca + rng.normal(0.0, 30.0, 3), 0, 255).astype(np.float32)
        kind = int(rng.integers(0, 4))
        if kind == 0:  # mottled colour
            t = _unit(smooth_field(rng, h, w, rng.uniform(6, 16)))
        elif kind == 1:  # gradient
            t = _unit(u)
        elif kind == 2:  # soft coarse stripes, unlike any class texture
            t = 0.5 + 0.5 * np.sin(2 * np.pi * v / rng.uniform(10, 18))
        else:  # fine grain
            t = _unit(cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 0.8))
        patch = ca * (1 - t[..., None]) + cb * t[..., None]
        img = img * (1 - alpha) + patch * alpha
    # Untextured distractors: background-labelled shapes with hard edges.
    distractors = []
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.14) * min(h, w)
        kind = ("ellipse", "rectangle", "triangle", "blob")[int(rng.integers(0, 4))]
        u, v = _local_coords(gx, gy, cx, cy, rng.uniform(0, 2 * np.pi))
        m = _shape_mask(kind, u, v, r, rng)
        if rng.random() < 0.3:  # a thin bar instead
            m = (np.abs(v) <= rng.uniform(1.0, 2.0)) & (np.abs(u) <= r * 2.5)
        if not m.any():
            continue
        ca, cb = _colour_pair(rng, 30.0)
        t = _unit(u)[..., None]
        img = np.where(m[..., None], ca * (1 - t) + cb * t, img)
        distractors.append(m)
    return img, distractors


def _core_pixels(mask: np.ndarray, void_width: int) -> int:
    """Pixels of ``mask`` outside any void band of that width (what survives in the GT)."""
    k = np.ones((void_width + 1, void_width + 1), np.uint8) if void_width > 0 else np.ones((1, 1), np.uint8)
    return int(cv2.erode(mask.astype(np.uint8), k).sum())


def _layout(rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray, classes: int,
            scale: tuple[float, float], max_objects: int, void_width: int) -> list[dict[str, Any]]:
    """Place 1..max_objects objects; returns them in painting order with their full masks."""
    h, w = gx.shape
    short = min(h, w)
    weights = np.array([0.3, 0.3, 0.25, 0.15] + [0.1] * max(0, max_objects - 4))[:max_objects]
    n_obj = int(rng.choice(np.arange(1, max_objects + 1), p=weights / weights.sum()))
    one_class = rng.random() < 0.3  # VOC often has several instances of a single class
    first_cls = int(rng.integers(1, classes + 1))
    min_core = max(12, int(0.004 * h * w))
    objects: list[dict[str, Any]] = []
    inst = np.full((h, w), -1, np.int16)
    for j in range(n_obj):
        cls = first_cls if (one_class or j == 0) else int(rng.integers(1, classes + 1))
        shape = CLASS_STYLES[cls - 1][0]
        for _attempt in range(25):
            r = rng.uniform(*scale) * short
            if objects and rng.random() < 0.5:
                # Next to (touching or overlapping) an earlier object.
                prev = objects[int(rng.integers(0, len(objects)))]
                a = rng.uniform(0, 2 * np.pi)
                d = prev["r"] * rng.uniform(0.6, 1.1) + r * rng.uniform(0.3, 0.9)
                cx, cy = prev["cx"] + d * math.cos(a), prev["cy"] + d * math.sin(a)
            else:
                cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
            angle = rng.uniform(0, 2 * np.pi)
            u, v = _local_coords(gx, gy, cx, cy, angle)
            mask = _shape_mask(shape, u, v, r, rng)
            trial = inst.copy()
            trial[mask] = j
            if all(_core_pixels(trial == i, void_width) >= min_core for i in range(j + 1)):
                objects.append({"cls": cls, "cx": cx, "cy": cy, "r": r, "angle": angle, "mask": mask})
                inst = trial
                break
        else:
            if not objects:  # keep at least one object: a centred one always fits
                r = scale[1] * short
                u, v = _local_coords(gx, gy, w / 2, h / 2, 0.0)
                mask = _shape_mask(shape, u, v, r, rng)
                objects.append({"cls": cls, "cx": w / 2, "cy": h / 2, "r": r, "angle": 0.0, "mask": mask})
                inst[mask] = 0
    for j, obj in enumerate(objects):
        obj["visible"] = inst == j
    return objects


def _render(rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray,
            objects: list[dict[str, Any]], img: np.ndarray, noise_sigma: float,
            colours: str, colour_jitter: float) -> np.ndarray:
    h, w = gx.shape
    for obj in objects:
        u, v = _local_coords(gx, gy, obj["cx"], obj["cy"], obj["angle"] + rng.uniform(-0.3, 0.3))
        t = _texture(CLASS_STYLES[obj["cls"] - 1][1], u, v, rng)[..., None]
        if colours == "class":
            ca, cb = _class_colour_pair(obj["cls"], rng, colour_jitter)
        else:
            ca, cb = _colour_pair(rng)
        shading = 1.0 + 0.25 * smooth_field(rng, h, w, 2.0 * obj["r"])[..., None]
        fill = (ca * (1 - t) + cb * t) * np.clip(shading, 0.6, 1.4)
        # A slightly soft edge, as a camera's anti-aliasing gives.
        alpha = cv2.GaussianBlur(obj["mask"].astype(np.float32), (0, 0), 0.6)[..., None]
        img = img * (1 - alpha) + fill * alpha
    img = img + rng.normal(0.0, noise_sigma, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _ground_truth(objects: list[dict[str, Any]], shape: tuple[int, int], void_width: int) -> np.ndarray:
    gt = np.zeros(shape, np.uint8)
    inst = np.zeros(shape, np.uint8)
    for j, obj in enumerate(objects):
        gt[obj["visible"]] = obj["cls"]
        inst[obj["visible"]] = j + 1
    if void_width > 0:
        # VOC outlines every object, so touching instances of one class are separated
        # by void too: the band follows instance, not class, boundaries.
        k = np.ones((void_width + 1, void_width + 1), np.uint8)
        band = cv2.dilate(inst, k) != cv2.erode(inst, k)
        gt[band] = IGNORE_INDEX
    return gt


# ----------------------------------------------------------------------------- simulated first stage


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.uint8)
    inside = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, 5)
    return inside - outside


def _pseudo_label(rng: np.random.Generator, objects: list[dict[str, Any]], distractors: list[np.ndarray],
                  shape: tuple[int, int], noise: float) -> np.ndarray:
    """CAM/IRN-like pseudo-label: errors at boundaries and on whole parts, never speckle."""
    h, w = shape
    label = np.zeros(shape, np.uint8)
    present = sorted({o["cls"] for o in objects})
    sdfs = [_signed_distance(o["visible"]) for o in objects]
    # Context confusion: a distractor next to an object takes the object's class
    # (the classic boat/water, train/rail confusion of CAMs).
    for d in distractors:
        free = d & ~np.any([o["visible"] for o in objects], axis=0)
        if not free.any() or rng.random() >= 0.35 * noise:
            continue
        near = [o for o, sdf in zip(objects, sdfs) if sdf[d].max() > -0.6 * o["r"]]
        if near:
            label[free] = near[int(rng.integers(0, len(near)))]["cls"]
    areas = [int(o["visible"].sum()) for o in objects]
    smallest = int(np.argmin(areas))
    wrong_whole = rng.random() < 0.18 * noise
    for j, (obj, sdf) in enumerate(zip(objects, sdfs)):
        r = obj["r"]
        # Boundary displaced by a per-object bias (CAMs tend to spill over) plus a smooth
        # wobble whose features are a fraction of the object's size.
        bias = noise * (rng.normal(1.1, 1.5) + 0.09 * r * rng.normal(0.0, 1.0))
        wobble = noise * (1.9 + 0.07 * r) * smooth_field(rng, h, w, max(4.0, 0.7 * r))
        region = sdf + bias + wobble > 0
        # A missed part: a bite taken out at the object's edge.
        if rng.random() < 0.5 * noise:
            ys, xs = np.nonzero(obj["visible"] & (sdf < 2.0))
            if len(ys):
                k = int(rng.integers(0, len(ys)))
                bite_r = r * rng.uniform(0.4, 0.75)
                dist = np.sqrt((np.arange(w, dtype=np.float32)[None, :] - xs[k]) ** 2
                               + (np.arange(h, dtype=np.float32)[:, None] - ys[k]) ** 2)
                bite = dist + 0.25 * bite_r * smooth_field(rng, h, w, max(4.0, 0.5 * bite_r)) < bite_r
                region &= ~bite
        cls = obj["cls"]
        # Occasionally the smallest object as a whole gets another class of the image or
        # is lost to background (a lone object only when small: big ones CAMs rarely miss).
        if wrong_whole and j == smallest and (len(objects) > 1 or areas[j] < 0.06 * h * w):
            choices = [c for c in present if c != cls] + [0]
            cls = choices[int(rng.integers(0, len(choices)))]
        label[region] = cls
    return label


def simulated_mask(rng: np.random.Generator, label: np.ndarray, keep: float, score_noise: float) -> np.ndarray:
    """(H, W) uint8 0/255: the confidence-mask rule (``datasets.handoff.keep_most_confident``,
    first-stage §14) ranking by a simulated score, the distance to the label's class boundaries
    plus noise."""
    h, w = label.shape
    k = np.ones((3, 3), np.uint8)
    boundary = cv2.dilate(label, k) != cv2.erode(label, k)
    # Half smooth, half per-pixel noise: a real margin varies smoothly along a boundary.
    smooth = smooth_field(rng, h, w, 8.0)
    white = rng.standard_normal((h, w))
    if boundary.any():
        dist = cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, 5)
        score = dist + score_noise * (smooth + white) / math.sqrt(2.0)
    else:
        # One label everywhere: nothing but noise to rank by; the smooth part alone
        # keeps the kept half in blobs rather than salt and pepper.
        score = smooth
    return keep_most_confident(score, label, keep) * 255


# ----------------------------------------------------------------------------- files


def _xml(item_id: str, shape: tuple[int, int], objects: list[dict[str, Any]]) -> str:
    h, w = shape
    lines = [
        "<annotation>",
        "\t<folder>VOC2012</folder>",
        f"\t<filename>{item_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>Synthetic VOC (BECO reimplementation)</database>",
        "\t\t<annotation>synthetic</annotation>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{w}</width>",
        f"\t\t<height>{h}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for obj in objects:
        ys, xs = np.nonzero(obj["visible"])
        truncated = int(ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1)
        lines += [
            "\t<object>",
            f"\t\t<name>{VOC_CLASSES[obj['cls']]}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{truncated}</truncated>",
            "\t\t<difficult>0</difficult>",
            "\t\t<bndbox>",  # VOC boxes are 1-based and inclusive
            f"\t\t\t<xmin>{int(xs.min()) + 1}</xmin>",
            f"\t\t\t<ymin>{int(ys.min()) + 1}</ymin>",
            f"\t\t\t<xmax>{int(xs.max()) + 1}</xmax>",
            f"\t\t\t<ymax>{int(ys.max()) + 1}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _image_size(rng: np.random.Generator, size: tuple[int, int], jitter: float) -> tuple[int, int]:
    if jitter <= 0:
        return int(size[0]), int(size[1])
    h = int(round(size[0] * rng.uniform(1 - jitter, 1 + jitter)))
    w = int(round(size[1] * rng.uniform(1 - jitter, 1 + jitter)))
    return max(16, h), max(16, w)


def _generate(k: int, settings: dict[str, Any], with_label: bool) -> dict[str, Any]:
    """Everything for the image with global index ``k``: image, GT, objects, pseudo-label, mask."""
    seed = settings["seed"]
    # Separate streams: changing the label-noise settings never changes the images.
    scene_rng = np.random.default_rng([seed, k, 0])
    label_rng = np.random.default_rng([seed, k, 1])
    h, w = _image_size(scene_rng, tuple(settings["size"]), settings["size_jitter"])
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg, distractors = _background(scene_rng, gx, gy)
    objects = _layout(scene_rng, gx, gy, settings["classes"], tuple(settings["object_scale"]),
                      settings["max_objects"], settings["void_width"])
    image = _render(scene_rng, gx, gy, objects, bg, settings["image_noise"],
                    settings.get("colours", "instance"), settings.get("colour_jitter", 0.0))
    gt = _ground_truth(objects, (h, w), settings["void_width"])
    out = {"image": image, "gt": gt, "objects": objects, "shape": (h, w)}
    if with_label:
        pseudo = _pseudo_label(label_rng, objects, distractors, (h, w), settings["label_noise"])
        out["pseudo"] = pseudo
        out["mask"] = simulated_mask(label_rng, pseudo, settings["mask_keep"], settings["mask_score_noise"])
    return out


def near_boundary(gt: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` px of a GT boundary (the void band, or label changes if none)."""
    k = np.ones((3, 3), np.uint8)
    boundary = (gt == IGNORE_INDEX) | (cv2.dilate(gt, k) != cv2.erode(gt, k))
    dist = cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, 5)
    return dist <= radius


def _output_paths(out: Path, ids: dict[str, list[str]]) -> list[Path]:
    voc = out / "VOC2012"
    paths: list[Path] = []
    for split in _SPLITS:
        for i in ids[split]:
            paths += [voc / "JPEGImages" / f"{i}.jpg", voc / "Annotations" / f"{i}.xml"]
            if split != "test":
                paths += [voc / "SegmentationClass" / f"{i}.png", voc / "SegmentationClassAug" / f"{i}.png"]
            if split == "train":
                paths += [out / PSEUDO_LABEL_DIR / f"{i}.png", out / MASK_DIR / f"{i}.png"]
    return paths


# ----------------------------------------------------------------------------- entry point


def make_synthetic_voc(out: str | Path, train: int = 200, val: int = 50, test: int = 20,
                       size: tuple[int, int] = (96, 128), classes: int = 5, seed: int = 0, *,
                       void_width: int = 2, size_jitter: float = 0.0,
                       object_scale: tuple[float, float] = (0.14, 0.3), max_objects: int = 4,
                       image_noise: float = 4.0, jpeg_quality: int = 90, label_noise: float = 1.0,
                       mask_keep: float = 0.5, mask_score_noise: float = 0.5,
                       colours: str = "instance", colour_jitter: float = 25.0,
                       overwrite: bool = False, progress: bool | Callable = False) -> dict:
    """Write a synthetic VOC-format data set with simulated first-stage outputs under ``out``.

    Args:
        out: data root; gets ``VOC2012/``, ``irn_pseudo_label/``, ``irn_mask/`` and
            ``synthetic_voc.json``.
        train, val, test: number of images per split (train = train_aug; VOC's
            ``train`` list is the first half of it).
        size: (height, width) of the images.
        classes: K foreground classes, the first K VOC class names (1 <= K <= 20).
        seed: every random draw derives from it.
        void_width: width in px of the 255 band along object outlines (0 = none).
        size_jitter: each image's height and width are scaled by a factor drawn from
            [1 - j, 1 + j] (0 = all images ``size``).
        object_scale: object radius range as a fraction of the short image side.
        max_objects: at most this many objects per image (at least 1).
        image_noise: std of the additive Gaussian pixel noise before JPEG.
        jpeg_quality: JPEG quality of the images.
        label_noise: scales every pseudo-label error (1.0 gives mIoU about 0.67 at
            the default size; 0 gives pseudo-label = GT without the void band).
        mask_keep: the gen_mask keep fraction ``thd``.
        mask_score_noise: std (px) of the noise added to the boundary distance that
            ranks pixels for the confidence mask.
        colours: "instance" draws every object's two colours at random, so only shape
            and texture tell classes apart (the hard default); "class" gives each class
            a fixed hue (bright and dark tone, ``colour_jitter`` per instance), which a
            network trained from scratch on a CPU learns in minutes (the demo).
        colour_jitter: per-channel range (0..255 scale) of the instance shift in
            "class" mode.
        overwrite: replace an existing set made with different settings.
        progress: True for a tqdm bar over images, or a callable wrapping an iterable.

    Returns:
        The summary also stored in ``out/synthetic_voc.json``: settings, id counts,
        pseudo-label scores against the GT (void ignored), mask statistics.

    A set already there with the same settings is left untouched and its summary
    returned; different settings raise ``FileExistsError`` unless ``overwrite``.
    """
    out = Path(out)
    if not 1 <= classes <= len(VOC_CLASSES) - 1:
        raise ValueError(f"classes must be in 1..{len(VOC_CLASSES) - 1}, got {classes}")
    if min(train, val, test) < 0 or train < 1:
        raise ValueError("need train >= 1 and val, test >= 0")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (height, width), each >= 32, got {size}")
    if not 0.0 < mask_keep <= 1.0:
        raise ValueError(f"mask_keep must be in (0, 1], got {mask_keep}")
    if colours not in COLOUR_MODES:
        raise ValueError(f"colours must be one of {COLOUR_MODES}, got {colours!r}")
    settings = {
        "generator_version": GENERATOR_VERSION, "train": int(train), "val": int(val), "test": int(test),
        "size": [int(size[0]), int(size[1])], "classes": int(classes), "seed": int(seed),
        "void_width": int(void_width), "size_jitter": float(size_jitter),
        "object_scale": [float(object_scale[0]), float(object_scale[1])], "max_objects": int(max_objects),
        "image_noise": float(image_noise), "jpeg_quality": int(jpeg_quality),
        "label_noise": float(label_noise), "mask_keep": float(mask_keep),
        "mask_score_noise": float(mask_score_noise),
    }
    if colours != "instance":  # absent for the default, so sets made before this option still match
        settings.update(colours=colours, colour_jitter=float(colour_jitter))
    summary_path = out / SUMMARY_NAME
    stored, done = previous_set(summary_path, settings, overwrite, "a synthetic VOC set")
    if done:
        return stored
    if stored is not None:
        if stored.get("settings") != settings:
            _remove_previous(out, stored.get("settings", {}), settings)
        # same settings but incomplete (an interrupted run): just generate again
    elif (out / "VOC2012").exists() and not overwrite:
        raise OutputExistsError(f"{out / 'VOC2012'} exists but was not made by this generator "
                              f"(no {SUMMARY_NAME}); pass overwrite=True to write over it")

    ids = synthetic_ids(train, val, test)
    # Marker first: an interrupted run is recognised as ours and redone, not refused.
    save_json(summary_path, {"settings": settings, "complete": False})

    voc = out / "VOC2012"
    palette = voc_palette()
    num_classes = classes + 1
    conf = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    stats = {"kept": 0, "pixels": 0, "kept_valid": 0, "kept_correct": 0, "unkept_valid": 0,
             "unkept_correct": 0, "near_valid": 0, "near_wrong": 0, "far_valid": 0, "far_wrong": 0}
    kept_per_class = np.zeros((num_classes, 2), np.int64)  # (kept, total) per pseudo-label class

    jobs = [(split, i) for split in _SPLITS for i in ids[split]]
    iterator: Any = enumerate(jobs)
    if progress is True:
        from tqdm import tqdm
        iterator = tqdm(iterator, total=len(jobs), desc="synthetic VOC", unit="img")
    elif callable(progress):
        iterator = progress(iterator)
    for k, (split, item_id) in iterator:
        sample = _generate(k, settings, with_label=split == "train")
        save_jpeg(voc / "JPEGImages" / f"{item_id}.jpg", sample["image"], quality=jpeg_quality)
        save_text(voc / "Annotations" / f"{item_id}.xml", _xml(item_id, sample["shape"], sample["objects"]))
        if split == "test":
            continue
        gt = sample["gt"]
        save_png(voc / "SegmentationClass" / f"{item_id}.png", gt, palette=palette)
        save_png(voc / "SegmentationClassAug" / f"{item_id}.png", gt, palette=palette)
        if split != "train":
            continue
        pseudo, mask = sample["pseudo"], sample["mask"]
        save_png(out / PSEUDO_LABEL_DIR / f"{item_id}.png", pseudo)
        save_mask(out / MASK_DIR / f"{item_id}.png", mask)
        # Statistics against the GT, void ignored.
        conf += confusion_matrix(torch.from_numpy(pseudo), torch.from_numpy(gt), num_classes)
        valid = gt != IGNORE_INDEX
        correct = pseudo == gt
        kept = mask > 0
        near = near_boundary(gt, 3.0)
        stats["pixels"] += gt.size
        stats["kept"] += int(kept.sum())
        for key, n in precision_counts(pseudo, mask, gt, valid).items():
            stats[key] += n
        stats["near_valid"] += int((near & valid).sum())
        stats["near_wrong"] += int((near & valid & ~correct).sum())
        stats["far_valid"] += int((~near & valid).sum())
        stats["far_wrong"] += int((~near & valid & ~correct).sum())
        kept_per_class[:, 0] += np.bincount(pseudo[kept], minlength=num_classes)[:num_classes]
        kept_per_class[:, 1] += np.bincount(pseudo.ravel(), minlength=num_classes)[:num_classes]

    split_dir = voc / "ImageSets" / "Segmentation"
    n_train_list = (len(ids["train"]) + 1) // 2
    lists = {"train_aug": ids["train"], "train": ids["train"][:n_train_list], "val": ids["val"], "test": ids["test"]}
    for name, names in lists.items():
        save_text(split_dir / f"{name}.txt", "".join(f"{i}\n" for i in names))

    scores = segmentation_scores(conf)
    names = list(VOC_CLASSES[:num_classes])

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    summary = {
        "complete": True,
        "settings": settings,
        "class_names": names,
        "counts": {name: len(v) for name, v in lists.items()},
        "pseudo_label": {
            "miou": scores["miou"],
            "pixel_acc": scores["pixel_acc"],
            "mean_acc": scores["mean_acc"],
            "iou": {n: v for n, v in zip(names, scores["iou"])},
            "error_rate_near_boundary": ratio(stats["near_wrong"], stats["near_valid"]),
            "error_rate_far_from_boundary": ratio(stats["far_wrong"], stats["far_valid"]),
        },
        "mask": {
            "kept_fraction": ratio(stats["kept"], stats["pixels"]),
            "kept_fraction_per_class": {n: ratio(int(a), int(b)) for n, (a, b) in zip(names, kept_per_class)},
            **mask_precision(stats),
        },
    }
    save_json(summary_path, summary)
    # Hand back exactly what a rerun would read from disk.
    return json.loads(summary_path.read_text())


def previous_set(summary_path: Path, settings: dict[str, Any], overwrite: bool, what: str
                 ) -> tuple[dict[str, Any] | None, bool]:
    """(the generator summary already at ``summary_path`` or None, whether it is complete and
    made with ``settings``). Other settings raise FileExistsError naming the keys that differ,
    unless ``overwrite``: a stale set is never trained on, nor silently replaced."""
    if not summary_path.is_file():
        return None, False
    stored = json.loads(summary_path.read_text())
    old = stored.get("settings", {})
    if old == settings:
        return stored, bool(stored.get("complete"))
    if not overwrite:
        changed = sorted(k for k in set(settings) | set(old) if settings.get(k) != old.get(k))
        raise OutputExistsError(f"{summary_path.parent} holds {what} made with different settings "
                              f"(differs in: {', '.join(changed)}); pass overwrite=True (--overwrite) to replace it")
    return stored, False


def make_synthetic_voc_from_config(out: str | Path, syn: Any, *, overwrite: bool = False,
                                   progress: bool | Callable = True) -> dict:
    """``make_synthetic_voc`` with the settings of a config's ``data.synthetic`` section."""
    return make_synthetic_voc(out, train=syn.train, val=syn.val, test=syn.test, size=tuple(syn.size),
                              classes=syn.classes, seed=syn.seed, colours=syn.colours,
                              colour_jitter=syn.colour_jitter, object_scale=tuple(syn.object_scale),
                              max_objects=syn.max_objects, overwrite=overwrite, progress=progress)


def _remove_previous(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Delete the files of a previous synthetic set that the new one will not rewrite."""
    try:
        old_ids = synthetic_ids(int(old["train"]), int(old["val"]), int(old["test"]))
    except (KeyError, TypeError, ValueError):
        return
    keep = set(_output_paths(out, synthetic_ids(new["train"], new["val"], new["test"])))
    for path in _output_paths(out, old_ids):
        if path not in keep and path.exists():
            path.unlink()


__all__ = ["make_synthetic_voc", "previous_set", "make_synthetic_voc_from_config", "synthetic_ids", "near_boundary", "smooth_field", "simulated_mask", "CLASS_STYLES", "GENERATOR_VERSION", "SUMMARY_NAME"]

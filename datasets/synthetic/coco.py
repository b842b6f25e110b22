"""A small synthetic COCO-2014-format tree, with simulated first-stage outputs.

The COCO code paths (``tools/prepare_coco.py``, the COCO data set, K = 81 classes, sparse
category ids, grey JPEGs, crowd regions, images without any object) need data that the
real readers take unchanged. This module writes, under ``out``::

    train2014/COCO_train2014_<12-digit id>.jpg    images (val2014/ alike)
    annotations/instances_{train,val}2014.json     COCO's instances format, all 80 categories
    irn_pseudo_label/<stem>.png                   train: simulated first-stage label, mode L, COCO label ids
    irn_mask/<stem>.png                           train: confidence mask, RGB 0/255 (gen_mask format)
    synthetic_coco.json                           settings, counts, the chosen category ids

and :func:`make_synthetic_coco_from_config` then runs ``prepare_coco`` on it, which adds
``mask/``, ``lists/``, ``cls_labels_*.json`` and ``prepare_coco.json``.

Scenes are the VOC generator's (``datasets/synthetic/voc.py``: same shapes, textures,
clutter, overlaps and simulated CAM/IRN errors; its functions are imported, not copied).
On top of it, the COCO specifics:

* the K synthetic classes are K **sparse** COCO category ids spread evenly over the 80
  (``synthetic_category_ids``), so label ids are not 1..K and some lie above the gaps of
  the id table (e.g. K = 5 gives categories 9, 27, 46, 62, 82 = labels 9, 25, 41, 57, 73);
* image ids increase with irregular gaps, train and val disjoint;
* each object's annotation is its **full** (amodal) mask and annotations come in painting
  order, so instances overlap and the reference's rule "later annotations over earlier
  ones" reproduces what the image shows; ids run backwards within an image and the JSON
  list interleaves images, so neither id order nor grouping can stand in for list order;
* segmentations are polygons (``cv2.findContours``) except for shapes with holes, the first
  instance of each split and every fourth one, which are compressed RLE (``counts`` a str);
* in each split: image 0 is grey (single-channel JPEG), image 1's last object is a crowd
  region (uncompressed RLE, ``iscrowd`` 1: background in the GT, present in the image-level
  label), the last image has no object at all (background only; its pseudo-label is all 0
  and its mask a seeded random half of the full-size image, first-stage QUIRK-15 fixed).

Every random draw comes from numpy Generators seeded by (seed, image index, stream), so the
same arguments give the same bytes for every file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image

from datasets.coco import (CATEGORIES, CATEGORY_TO_LABEL, NUM_CLASSES, SPLITS, cls_labels_name, coco_files,
                           list_name, split_folder, stem_of)
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR, random_keep, save_mask
from datasets.prepare.coco import SUMMARY_NAME as PREPARE_SUMMARY_NAME
from datasets.prepare.coco import annotation_path, prepare_coco
from datasets.synthetic.voc import (CLASS_STYLES, COLOUR_MODES, _background, _generate, _image_size, _render,
                                    previous_set)
from utils.errors import OutputExistsError
from utils.io import atomic_write, save_jpeg, save_json, save_png
from utils.metrics import confusion_matrix, segmentation_scores

# Bump when the output changes for the same arguments (a stored tree then counts as other settings).
GENERATOR_VERSION = 1
SUMMARY_NAME = "synthetic_coco.json"
GREY_POSITION, CROWD_POSITION = 0, 1  # within each split; the empty image is the split's last
MIN_PER_SPLIT = 3
RLE_EVERY = 4

# COCO's supercategories (the instances files carry one per category).
_SUPER: tuple[tuple[int, int, str], ...] = (
    (1, 1, "person"), (2, 9, "vehicle"), (10, 15, "outdoor"), (16, 25, "animal"), (27, 33, "accessory"),
    (34, 43, "sports"), (44, 51, "kitchen"), (52, 61, "food"), (62, 70, "furniture"),
    (72, 77, "electronic"), (78, 82, "appliance"), (84, 90, "indoor"),
)


def supercategory(category_id: int) -> str:
    for lo, hi, name in _SUPER:
        if lo <= category_id <= hi:
            return name
    raise ValueError(f"not a COCO category id: {category_id}")


def coco_categories() -> list[dict[str, Any]]:
    """The ``categories`` list of an instances file: all 80, ascending id."""
    return [{"id": cid, "name": name, "supercategory": supercategory(cid)} for cid, name in CATEGORIES]


def synthetic_category_ids(classes: int) -> list[int]:
    """COCO category ids of synthetic classes 1..K: the centres of K equal bins of the 80."""
    if not 1 <= classes <= len(CLASS_STYLES):
        raise ValueError(f"classes must be in 1..{len(CLASS_STYLES)}, got {classes}")
    n = len(CATEGORIES)
    return [CATEGORIES[(2 * j + 1) * n // (2 * classes)][0] for j in range(classes)]


def synthetic_image_ids(train: int, val: int) -> dict[str, list[int]]:
    """Increasing image ids with irregular gaps (2..8), train first, then val (disjoint)."""
    ids = [9 + 5 * k + (k * k) % 4 for k in range(train + val)]
    return {"train": ids[:train], "val": ids[train:]}


# ----------------------------------------------------------------------------- encodings


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE, ``counts`` as str (what a JSON file holds)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.astype(bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _polygons(mask: np.ndarray) -> list[list[float]] | None:
    """Outer contours as COCO polygons, or None when the mask has a hole (a polygon list
    can only fill) or no contour of 3+ points. +0.5: pycocotools puts pixel i's centre
    at i + 0.5, findContours at i."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or (hierarchy[0][:, 3] >= 0).any():
        return None
    polys = [(c.reshape(-1, 2).astype(np.float64) + 0.5).ravel().tolist() for c in contours if len(c) >= 3]
    return polys or None


def _annotation(mask: np.ndarray, *, crowd: bool, want_rle: bool) -> tuple[dict[str, Any], np.ndarray, str]:
    """(segmentation/area/bbox/iscrowd, the mask it rasterises to, its kind)."""
    from pycocotools import mask as mask_utils
    h, w = mask.shape
    if crowd:
        segm: Any = uncompressed_rle(mask)
        kind = "crowd"
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        polys = None if want_rle else _polygons(mask)
        if polys is None:
            segm, kind = _rle(mask), "rle"
            rle = segm  # pycocotools reads str counts as they come from a JSON file
        else:
            segm, kind = polys, "polygon"
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    drawn = mask_utils.decode(rle)
    fields = {"segmentation": segm, "area": float(mask_utils.area(rle)),
              "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd)}
    return fields, drawn, kind


# ----------------------------------------------------------------------------- files


def _generated_paths(out: Path, ids: dict[str, list[int]]) -> list[Path]:
    """The files this generator writes for a tree with these image ids."""
    paths: list[Path] = []
    for split in SPLITS:
        folder = split_folder(split)
        paths.append(annotation_path(out, split))
        for i in ids.get(split, []):
            stem = stem_of(split, i)
            paths.append(out / folder / f"{stem}.jpg")
            if split == "train":
                paths += [out / PSEUDO_LABEL_DIR / f"{stem}.png", out / MASK_DIR / f"{stem}.png"]
    return paths


def _prepared_paths(out: Path, ids: dict[str, list[int]]) -> list[Path]:
    """The files ``prepare_coco`` writes for it (stale as soon as the annotations change)."""
    paths: list[Path] = [out / PREPARE_SUMMARY_NAME]
    for split in SPLITS:
        folder = split_folder(split)
        paths += [out / "lists" / list_name(split), out / cls_labels_name(split)]
        paths += [out / "mask" / folder / f"{i}.png" for i in ids.get(split, [])]
    return paths


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_file():
            p.unlink()


def _settings_ids(settings: dict[str, Any]) -> dict[str, list[int]] | None:
    try:
        return synthetic_image_ids(int(settings["train"]), int(settings["val"]))
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- entry points


def make_synthetic_coco(out: str | Path, *, train: int = 24, val: int = 8, size: tuple[int, int] = (96, 128),
                        classes: int = 5, seed: int = 0, colours: str = "instance", colour_jitter: float = 25.0,
                        object_scale: tuple[float, float] = (0.14, 0.3), max_objects: int = 4,
                        size_jitter: float = 0.0, overwrite: bool = False,
                        progress: bool | Callable = False) -> dict:
    """Write a synthetic COCO-2014-format tree with simulated first-stage outputs under ``out``.

    Args:
        out: COCO root to write (``train2014/``, ``val2014/``, ``annotations/``,
            ``irn_pseudo_label/``, ``irn_mask/``, ``synthetic_coco.json``).
        train, val: images per split, each >= 3 (a grey, a crowd and an empty image per split).
        size: (height, width) of the images; ``size_jitter`` j scales each image's sides by
            factors drawn from [1 - j, 1 + j] (COCO's images differ in size; 0 = all ``size``).
        classes: K synthetic classes (1..20), mapped to K sparse COCO category ids.
        seed: every random draw derives from it.
        colours, colour_jitter, object_scale, max_objects: the VOC generator's scene options
            (``datasets/synthetic_voc.make_synthetic_voc``).
        overwrite: replace a tree made with different settings (or not made by this generator).
        progress: True for a tqdm bar over images, or a callable wrapping an iterable.

    Returns:
        The summary also stored in ``out/synthetic_coco.json``.

    A tree already there with the same settings is left untouched and its summary returned;
    other settings raise ``FileExistsError`` unless ``overwrite``. Files of the prepared
    outputs (``mask/`` etc.) of a replaced tree are removed, so ``prepare_coco`` never keeps
    masks of other annotations.
    """
    out = Path(out)
    if not 1 <= classes <= len(CLASS_STYLES):
        raise ValueError(f"classes must be in 1..{len(CLASS_STYLES)}, got {classes}")
    if min(train, val) < MIN_PER_SPLIT:
        raise ValueError(f"need train, val >= {MIN_PER_SPLIT} (a grey, a crowd and an empty image per split), "
                         f"got train={train}, val={val}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (height, width), each >= 32, got {size}")
    if colours not in COLOUR_MODES:
        raise ValueError(f"colours must be one of {COLOUR_MODES}, got {colours!r}")
    if not 0.0 <= size_jitter < 0.5:
        raise ValueError(f"size_jitter must be in [0, 0.5), got {size_jitter}")
    settings = {
        "generator_version": GENERATOR_VERSION, "train": int(train), "val": int(val),
        "size": [int(size[0]), int(size[1])], "size_jitter": float(size_jitter), "classes": int(classes),
        "seed": int(seed), "colours": colours, "colour_jitter": float(colour_jitter),
        "object_scale": [float(object_scale[0]), float(object_scale[1])], "max_objects": int(max_objects),
        # Fixed: the VOC generator's defaults (void_width only shapes the layout here; COCO's GT has no void).
        "void_width": 2, "image_noise": 4.0, "jpeg_quality": 90, "label_noise": 1.0,
        "mask_keep": 0.5, "mask_score_noise": 0.5,
    }
    summary_path = out / SUMMARY_NAME
    ids = synthetic_image_ids(train, val)
    stored, done = previous_set(summary_path, settings, overwrite, "a synthetic COCO tree")
    if done:
        return stored
    if stored is not None:
        if stored.get("settings") != settings:
            old_ids = _settings_ids(stored.get("settings", {}))
            if old_ids is not None:
                _remove(_generated_paths(out, old_ids) + _prepared_paths(out, old_ids))
    elif any((out / d).exists() for d in ("annotations", "train2014", "val2014", "mask")) and not overwrite:
        raise OutputExistsError(f"{out} holds COCO-like folders not made by this generator (no {SUMMARY_NAME}); "
                              f"pass overwrite=True to write over it")
    # Prepared outputs of whatever was here are stale once the annotations are rewritten.
    _remove(_prepared_paths(out, ids))
    # Marker first: an interrupted run is recognised as ours and redone, not refused.
    save_json(summary_path, {"settings": settings, "complete": False})

    cat_ids = synthetic_category_ids(classes)
    lut = np.zeros(256, np.uint8)
    for k, cid in enumerate(cat_ids, start=1):
        lut[k] = CATEGORY_TO_LABEL[cid]

    jobs = [(split, pos, image_id) for split in SPLITS for pos, image_id in enumerate(ids[split])]
    iterator: Any = enumerate(jobs)
    if progress is True:
        from tqdm import tqdm
        iterator = tqdm(iterator, total=len(jobs), desc="synthetic COCO", unit="img")
    elif callable(progress):
        iterator = progress(iterator)

    per_image: dict[str, list[tuple[int, int, int, list[dict[str, Any]]]]] = {s: [] for s in SPLITS}
    counts = {s: {"images": len(ids[s]), "annotations": 0, "polygon": 0, "rle": 0, "crowd": 0,
                  "overlapping_pairs": 0, "grey_images": [], "crowd_images": [], "empty_images": [],
                  "first_image_id": ids[s][0], "last_image_id": ids[s][-1]} for s in SPLITS}
    for k, (split, pos, image_id) in iterator:
        stem = stem_of(split, image_id)
        c = counts[split]
        empty = pos == len(ids[split]) - 1
        if empty:
            image, objects, shape = _empty_scene(k, settings)
        else:
            sample = _generate(k, settings, with_label=split == "train")
            image, objects, shape = sample["image"], sample["objects"], sample["shape"]
        if pos == GREY_POSITION:
            image = np.asarray(Image.fromarray(image).convert("L"))
            c["grey_images"].append(stem)
        save_jpeg(out / split_folder(split) / f"{stem}.jpg", image, quality=settings["jpeg_quality"])

        anns: list[dict[str, Any]] = []
        drawn: list[np.ndarray] = []
        for j, obj in enumerate(objects):
            crowd = pos == CROWD_POSITION and j == len(objects) - 1
            want_rle = c["annotations"] % RLE_EVERY == 0  # the split's first instance, then every 4th
            fields, m, kind = _annotation(obj["mask"], crowd=crowd, want_rle=want_rle)
            if not m.any():
                continue
            anns.append({"category_id": cat_ids[obj["cls"] - 1], **fields})
            drawn.append(m)
            c["annotations"] += 1
            c[kind] += 1
        if any(a["iscrowd"] for a in anns):
            c["crowd_images"].append(stem)
        if empty:
            c["empty_images"].append(stem)
        c["overlapping_pairs"] += sum(1 for a in range(len(drawn)) for b in range(a + 1, len(drawn))
                                      if (drawn[a] & drawn[b]).any())
        per_image[split].append((image_id, shape[0], shape[1], anns))

        if split == "train":
            if empty:
                rng = np.random.default_rng([settings["seed"], k, 1])
                pseudo, mask = np.zeros(shape, np.uint8), random_keep(rng, shape, settings["mask_keep"])
            else:
                # The mask rule ranks pixels per class region; an injective relabelling
                # changes no region, so the VOC generator's mask stays valid.
                pseudo, mask = lut[sample["pseudo"]], sample["mask"]
            save_png(out / PSEUDO_LABEL_DIR / f"{stem}.png", pseudo)
            save_mask(out / MASK_DIR / f"{stem}.png", mask)

    next_id = 1
    for split in SPLITS:
        images, annotations, rounds = [], [], []
        for image_id, h, w, anns in per_image[split]:
            images.append({"id": image_id, "file_name": f"{stem_of(split, image_id)}.jpg",
                           "height": int(h), "width": int(w)})
            # ids backwards within an image: painting order is list order only
            for j, a in enumerate(anns):
                a["id"] = next_id + len(anns) - 1 - j
                a["image_id"] = image_id
            next_id += len(anns)
            rounds.append(anns)
        for j in range(max((len(a) for a in rounds), default=0)):  # interleave images
            annotations += [anns[j] for anns in rounds if j < len(anns)]
        data = {
            "info": {"description": "synthetic COCO 2014-format set (BECO reimplementation)",
                     "version": str(GENERATOR_VERSION), "year": 2014},
            "licenses": [],
            "images": images,
            "annotations": [{key: a[key] for key in ("id", "image_id", "category_id", "segmentation",
                                                       "area", "bbox", "iscrowd")} for a in annotations],
            "categories": coco_categories(),
        }
        _save_compact_json(annotation_path(out, split), data)

    summary = {
        "complete": True,
        "settings": settings,
        "category_ids": cat_ids,
        "label_ids": [CATEGORY_TO_LABEL[c] for c in cat_ids],
        "class_names": [dict(CATEGORIES)[c] for c in cat_ids],
        "splits": counts,
    }
    save_json(summary_path, summary)
    return json.loads(summary_path.read_text())


def make_synthetic_coco_from_config(out: str | Path, syn: Any, *, overwrite: bool = False,
                                    progress: bool | Callable = True) -> dict:
    """``make_synthetic_coco`` with a config's ``data.synthetic`` settings (``test`` ignored:
    COCO 2014 has no test split), then ``prepare_coco`` so the tree is complete.

    Returns the generator's summary with the preparation's under ``"prepare"``.
    """
    summary = make_synthetic_coco(
        out, train=syn.train, val=syn.val, size=tuple(syn.size), classes=syn.classes, seed=syn.seed,
        colours=syn.colours, colour_jitter=syn.colour_jitter, object_scale=tuple(syn.object_scale),
        max_objects=syn.max_objects, size_jitter=float(getattr(syn, "size_jitter", 0.0) or 0.0),
        overwrite=overwrite, progress=progress)
    prepared = prepare_coco(out, SPLITS, progress=progress is True)
    return {**summary, "prepare": prepared, "pseudo_label": pseudo_label_scores(Path(out))}


def pseudo_label_scores(root: Path) -> dict:
    """The simulated pseudo-labels against the prepared train ground truth (81 classes, every
    pixel counts), streamed image by image."""
    files = coco_files(root, "train", "lists")
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in files.ids:
        pseudo = np.array(Image.open(root / PSEUDO_LABEL_DIR / f"{i}.png"))
        gt = np.array(Image.open(files.gt(i)))
        conf += confusion_matrix(torch.from_numpy(pseudo), torch.from_numpy(gt), NUM_CLASSES)
    scores = segmentation_scores(conf)
    return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"]}


def _empty_scene(k: int, settings: dict[str, Any]) -> tuple[np.ndarray, list, tuple[int, int]]:
    """Background and distractors only: the scene stream of ``_generate`` without objects."""
    rng = np.random.default_rng([settings["seed"], k, 0])
    h, w = _image_size(rng, tuple(settings["size"]), settings["size_jitter"])
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg, _ = _background(rng, gx, gy)
    image = _render(rng, gx, gy, [], bg, settings["image_noise"], settings["colours"], settings["colour_jitter"])
    return image, [], (h, w)


def _save_compact_json(path: Path, obj: Any) -> Path:
    """Instances files are big: no indentation (COCO's own are one line)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
    return atomic_write(path, write)


__all__ = ["make_synthetic_coco", "make_synthetic_coco_from_config", "synthetic_category_ids",
           "synthetic_image_ids", "coco_categories", "supercategory", "uncompressed_rle",
           "GENERATOR_VERSION", "SUMMARY_NAME"]

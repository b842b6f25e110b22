"""Pseudo-labels from any first stage, imported into the second stage's layout with a manifest
and a quality report (``tools/import_labels.py`` is its command line; docs/pseudo-labels.md).

Input formats (``FORMATS``; label files are ``<id>.png`` for every id of the named split):

* ``ours``: our own and the reference's layout, a label folder and a mask folder
  (``irn_pseudo_label/`` + ``irn_mask/``, masks as ``datasets.handoff.save_mask`` writes them);
* ``png255``: labels whose 255 means "uncertain" (CLIP-based producers);
* ``labels``: label-only sets without any confidence;
* ``scores``: labels plus per-class score maps ``<id>.npy`` (C, H, W) or ``<id>.npz`` (one key).

Labels may be grey-index PNGs (mode L) or palette PNGs (mode P, read by index; every colour used
must be the VOC palette's colour of that index). Values are class ids 0..C-1 or 255.

Confidence-mask rules (``RULES``), one per input, the first of a format's list its default:

* ``given`` (ours): the producer's mask as it is;
* ``uncertain-255`` (png255): reliable where the label is not 255;
* ``boundary`` (labels, default): every pixel within ``boundary_width`` pixels (chessboard
  distance) of a pixel with another label is unreliable: BECO's premise that errors gather at
  boundaries; ``all`` (labels): every pixel reliable;
* ``top-probability`` (scores): reliable where the largest of the C scores is >= ``score_threshold``.

Whatever the rule, a pixel labelled 255 is unreliable (mask 0) and keeps its label 255: the
second stage's CE term never sees it, its co-training term covers it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image

from datasets.handoff import mask_precision, precision_counts, save_mask
from datasets.readers import SplitFiles, read_label, read_mask, png_name
from utils.crf import parallel_map
from utils.errors import ConfigError, DataError, OutputExistsError
from utils.io import save_json, save_png, save_text
from utils.metrics import confusion_of_maps, segmentation_scores
from utils.provenance import sha256
from utils.voc import IGNORE_INDEX, voc_palette

MANIFEST_NAME = "label_manifest.json"
QUALITY_JSON = "label_quality.json"
QUALITY_MD = "label_quality.md"
MANIFEST_FORMAT = 1

# Input format -> the confidence rules it allows, its default first.
FORMATS: dict[str, tuple[str, ...]] = {
    "ours": ("given",),
    "png255": ("uncertain-255",),
    "labels": ("boundary", "all"),
    "scores": ("top-probability",),
}
RULES = ("given", "uncertain-255", "boundary", "all", "top-probability")

# The rules' parameters, stated once (the CLI's defaults are these).
# boundary_width 5: VOC's ground truth marks a void band about 5 pixels wide along object
# outlines, the width within which even annotators disagree.
# score_threshold 0.5: reliable where the top class is more probable than all others together.
DEFAULT_BOUNDARY_WIDTH = 5
DEFAULT_SCORE_THRESHOLD = 0.5

SHOWN = 5  # files named in an error before "(and N more)"


@dataclass(frozen=True)
class Source:
    """One producer's files: ``labels/<id>.png``, and ``masks/<id>.png`` (ours) or
    ``scores/<id>.npy|npz`` (scores)."""
    format: str
    labels: Path
    masks: Path | None = None
    scores: Path | None = None
    score_key: str | None = None   # the array's key inside an .npz (None: its only array)
    rule: str | None = None        # None: the format's default
    boundary_width: int = DEFAULT_BOUNDARY_WIDTH
    score_threshold: float = DEFAULT_SCORE_THRESHOLD

    def resolved_rule(self) -> str:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown label format {self.format!r}; known: {sorted(FORMATS)}")
        rule = self.rule or FORMATS[self.format][0]
        if rule not in FORMATS[self.format]:
            raise ConfigError(f"rule {rule!r} does not apply to format {self.format!r}; "
                            f"it allows {list(FORMATS[self.format])}")
        return rule

    def rule_record(self) -> dict[str, Any]:
        """The rule and its parameters as the manifest records them."""
        rule = self.resolved_rule()
        out: dict[str, Any] = {"name": rule, "default_for_format": rule == FORMATS[self.format][0],
                               "label_255": "unreliable (mask 0), label kept"}
        if rule == "boundary":
            out["width"] = self.boundary_width
        if rule == "top-probability":
            out["threshold"] = self.score_threshold
        return out

    def check(self) -> None:
        """The folders each format needs exist and the parameters are in range."""
        self.resolved_rule()
        if not self.labels.is_dir():
            raise DataError(f"label folder not found: {self.labels}")
        if self.format == "ours" and (self.masks is None or not self.masks.is_dir()):
            raise DataError(f"format 'ours' needs its mask folder (--masks); not found: {self.masks}")
        if self.format == "scores" and (self.scores is None or not self.scores.is_dir()):
            raise DataError(f"format 'scores' needs its score-map folder (--scores); not found: {self.scores}")
        if self.boundary_width < 0:
            raise ConfigError(f"boundary width must be >= 0, got {self.boundary_width}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"score threshold must be in [0, 1], got {self.score_threshold}")

    def paths(self) -> dict[str, str | None]:
        return {"labels": str(self.labels.resolve()),
                "masks": str(self.masks.resolve()) if self.masks else None,
                "scores": str(self.scores.resolve()) if self.scores else None,
                "score_key": self.score_key}


# ----------------------------------------------------------------------------- rules


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within ``width`` pixels (chessboard distance) of a pixel with another
    value. The largest and smallest value over each (2·width+1)² window differ exactly there;
    outside the image counts as nothing (the image border is no boundary)."""
    if width <= 0:
        return np.zeros(label.shape, dtype=bool)
    kernel = np.ones((2 * width + 1, 2 * width + 1), dtype=np.uint8)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    return cv2.dilate(label, kernel) != cv2.erode(label, kernel)


def top_probability(scores: np.ndarray) -> np.ndarray:
    """(H, W): the largest of the C per-class scores of each pixel."""
    return scores.max(axis=0)


def confidence(source: Source, label: np.ndarray, mask: np.ndarray | None, scores: np.ndarray | None) -> np.ndarray:
    """(H, W) uint8, 1 = reliable, by the source's rule; label 255 is always unreliable."""
    rule = source.resolved_rule()
    if rule == "given":
        reliable = mask > 0
    elif rule == "boundary":
        reliable = ~boundary_band(label, source.boundary_width)
    elif rule == "top-probability":
        reliable = top_probability(scores) >= source.score_threshold
    else:  # "all", "uncertain-255": only the 255 rule below
        reliable = np.ones(label.shape, dtype=bool)
    return (reliable & (label != IGNORE_INDEX)).astype(np.uint8)


# ----------------------------------------------------------------------------- reading


class PaletteError(DataError):
    """A palette PNG whose colours are not the data set's."""


def read_source_label(path: Path, item_id: str, num_classes: int) -> np.ndarray:
    """A producer's label map (H, W) uint8: L or P PNG, values 0..C-1 or 255; a palette PNG's
    colours of the values it uses must be the VOC palette's."""
    if not path.is_file():
        raise DataError(f"label missing for id '{item_id}': {path}")
    with Image.open(path) as img:
        mode, palette = img.mode, img.getpalette()
    if mode == "P" and palette is not None:
        arr = np.asarray(read_label(path, item_id, num_classes, "label"))
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        used = np.unique(arr)
        used = used[used < len(colours)]
        wrong = used[np.any(colours[used] != voc_palette()[used], axis=1)]
        if wrong.size:
            v = int(wrong[0])
            raise PaletteError(f"label for id '{item_id}' is a palette PNG whose palette is not the data set's "
                            f"(VOC's): index {v} is {tuple(colours[v].tolist())}, VOC's is "
                            f"{tuple(voc_palette()[v].tolist())}: {path}")
        return arr
    return np.asarray(read_label(path, item_id, num_classes, "label"))


def load_scores(path: Path, item_id: str, key: str | None) -> np.ndarray:
    """(C, H, W) float32 score maps of ``<id>.npy`` or ``<id>.npz`` (``key``, or its only array)."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                keys = list(z.keys())
                if key is None and len(keys) != 1:
                    raise DataError(f"score maps for id '{item_id}': {path} holds {keys}; name one (--score-key)")
                k = key if key is not None else keys[0]
                if k not in keys:
                    raise DataError(f"score maps for id '{item_id}': {path} has no key {k!r} (it has {keys})")
                arr = z[k]
        else:
            arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"score maps for id '{item_id}' are unreadable: {path} ({e})") from None
    return np.asarray(arr, dtype=np.float32)


def score_path(source: Source, item_id: str) -> Path:
    """``<id>.npy``, else ``<id>.npz``."""
    npy = source.scores / f"{item_id}.npy"
    return npy if npy.is_file() else source.scores / f"{item_id}.npz"


# ----------------------------------------------------------------------------- checking


@dataclass
class Problems:
    """Every problem found before writing, by kind, so one error names them all."""
    kinds: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        self.kinds.setdefault(kind, []).append(message)

    def raise_any(self, what: str) -> None:
        if not self.kinds:
            return
        parts = []
        for kind, messages in self.kinds.items():
            more = f"; and {len(messages) - SHOWN} more" if len(messages) > SHOWN else ""
            parts.append(f"{kind} ({len(messages)}): " + "; ".join(messages[:SHOWN]) + more)
        raise DataError(f"{what}: nothing was written.\n  " + "\n  ".join(parts))


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def check_one(source: Source, files: SplitFiles, item_id: str, num_classes: int) -> list[tuple[str, str]]:
    """(kind, message) of every problem of one id; reads its files once."""
    image = files.image(item_id)
    if not image.is_file():
        return [("ids without images", f"'{item_id}': {image}")]
    label_path = source.labels / png_name(item_id)
    if not label_path.is_file():
        return [("images without labels", f"'{item_id}': {label_path}")]
    out: list[tuple[str, str]] = []
    width, height = _image_size(image)
    try:
        label = read_source_label(label_path, item_id, num_classes)
    except PaletteError as e:
        return [("unknown palettes", str(e))]
    except DataError as e:
        return [("unreadable labels or values above the class count", str(e))]
    if label.shape != (height, width):
        out.append(("label size != image size", f"'{item_id}': {label_path} is {label.shape[1]}x{label.shape[0]}, "
                                                 f"the image {width}x{height}"))
    if source.format == "ours":
        mask_path = source.masks / png_name(item_id)
        try:
            mask = np.asarray(read_mask(mask_path, item_id))
            if mask.shape != (height, width):
                out.append(("mask size != image size", f"'{item_id}': {mask_path} is {mask.shape[1]}x{mask.shape[0]}, "
                                                       f"the image {width}x{height}"))
        except DataError as e:
            out.append(("masks missing or unreadable", str(e)))
    if source.format == "scores":
        path = score_path(source, item_id)
        if not path.is_file():
            out.append(("score maps missing", f"'{item_id}': {source.scores / item_id}.npy or .npz"))
        else:
            try:
                scores = load_scores(path, item_id, source.score_key)
            except DataError as e:
                out.append(("score maps unreadable", str(e)))
            else:
                if scores.shape != (num_classes, height, width):
                    out.append(("score maps of the wrong shape", f"'{item_id}': {path} is {scores.shape}, expected "
                                                                 f"({num_classes}, {height}, {width}) (C, H, W)"))
                elif not (np.isfinite(scores).all() and scores.min() >= 0.0 and scores.max() <= 1.0):
                    # Logits or unnormalised CAMs: a threshold on them would mean nothing.
                    out.append(("score maps not probabilities in [0, 1]",
                                f"'{item_id}': {path} ranges {scores.min():g}..{scores.max():g}"))
    return out


# ----------------------------------------------------------------------------- importing


@dataclass(frozen=True)
class Job:
    """What every worker needs to import one id."""
    source: Source
    files: SplitFiles
    num_classes: int
    gt_ignore: int | None
    label_dir: Path   # the temporary folders being filled
    mask_dir: Path


def import_one(job: Job, item_id: str) -> dict[str, Any]:
    """Write one id's label and mask; its counts, file hashes and (with ground truth) the pixel
    counts of the quality report."""
    s = job.source
    n = job.num_classes
    label = read_source_label(s.labels / png_name(item_id), item_id, n)
    mask = np.asarray(read_mask(s.masks / png_name(item_id), item_id)) if s.format == "ours" else None
    scores = load_scores(score_path(s, item_id), item_id, s.score_key) if s.format == "scores" else None
    reliable = confidence(s, label, mask, scores)
    name = png_name(item_id)
    save_png(job.label_dir / name, label)
    save_mask(job.mask_dir / name, reliable)
    out: dict[str, Any] = {
        "id": item_id, "pixels": int(label.size), "kept": int(reliable.sum()),
        "uncertain_255": int((label == IGNORE_INDEX).sum()),
        "histogram": np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=n)[:n],
        "label_sha256": sha256(job.label_dir / name), "mask_sha256": sha256(job.mask_dir / name),
        "gt": None,
    }
    gt_path = job.files.gt(item_id) if job.files.gt_dir is not None else None
    if gt_path is not None and gt_path.is_file():
        gt = np.asarray(read_label(gt_path, item_id, n, "ground truth", job.gt_ignore))
        if gt.shape != label.shape:
            raise DataError(f"id '{item_id}': ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}, "
                            f"the label {label.shape[1]}x{label.shape[0]}")
        out["gt"] = quality_counts(label, reliable, gt, n, job.gt_ignore)
    return out


def quality_counts(label: np.ndarray, reliable: np.ndarray, gt: np.ndarray, n: int,
                   gt_ignore: int | None) -> dict[str, Any]:
    """One image's share of the quality report: the (C+1)² confusion matrix whose last column
    is "no prediction" (label 255), over pixels whose ground truth is not void, and the
    kept/dropped precision counts over the pixels with ground truth and a label."""
    pred = np.where(label == IGNORE_INDEX, n, label).astype(np.int64)
    ignore = gt_ignore if gt_ignore is not None else -1
    conf = confusion_of_maps(gt.astype(np.int64), pred, n + 1, ignore)
    valid = (gt != ignore) & (label != IGNORE_INDEX)
    counts = precision_counts(label, reliable, gt, valid)
    gt_valid = gt != ignore
    counts.update(gt_pixels=int(gt_valid.sum()), gt_kept=int((gt_valid & (reliable > 0)).sum()))
    return {"conf": conf, **counts}


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job


_JOB: Job | None = None


def _import_task(item_id: str) -> dict[str, Any]:
    return import_one(_JOB, item_id)


def _check_task(item_id: str) -> list[tuple[str, str]]:
    return check_one(_JOB.source, _JOB.files, item_id, _JOB.num_classes)


def _temp_sibling(folder: Path, tag: str) -> Path:
    return folder.parent / f".{folder.name}.{tag}-{secrets.token_hex(4)}"


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def plan_output(label_dir: Path, mask_dir: Path, overwrite: bool) -> None:
    """Refuse folders that hold files: another import's unless ``overwrite``; anything not made
    by an import (no manifest, or a mask folder no manifest names) even with ``overwrite``."""
    if label_dir.resolve() == mask_dir.resolve() or label_dir.resolve() in mask_dir.resolve().parents \
            or mask_dir.resolve() in label_dir.resolve().parents:
        raise DataError(f"the label folder {label_dir} and the mask folder {mask_dir} must be two separate folders")
    manifest = label_dir / MANIFEST_NAME
    ours = manifest.is_file()
    recorded_mask = Path(read_manifest(label_dir).get("mask_dir_resolved", "")) if ours else None
    for folder, what in ((label_dir, "label"), (mask_dir, "mask")):
        if not _has_files(folder):
            continue
        made_by_import = ours and (folder == label_dir or folder.resolve() == recorded_mask)
        if not made_by_import:
            raise OutputExistsError(f"the {what} folder {folder} holds files no label import made (no {MANIFEST_NAME} "
                                    f"naming it): nothing there is replaced, even with --overwrite; choose other "
                                    f"folders (data.pseudo_label_dir, data.mask_dir) or move it away")
        if not overwrite:
            raise OutputExistsError(f"the {what} folder {folder} holds an earlier import ({manifest}): pass "
                                    f"--overwrite to replace it, or choose other folders")


def _install(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; a folder already there goes aside first and is deleted after."""
    old = None
    if final.exists():
        old = _temp_sibling(final, "old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)


@dataclass
class Target:
    """Where the import goes, from the data config: ``<root>/<pseudo_label_dir>`` and ``<root>/<mask_dir>``."""
    root: Path
    pseudo_label_dir: str
    mask_dir: str

    @property
    def labels(self) -> Path:
        return self.root / self.pseudo_label_dir

    @property
    def masks(self) -> Path:
        return self.root / self.mask_dir


def import_labels(source: Source, files: SplitFiles, target: Target, *, dataset: str, split: str,
                  num_classes: int, class_names: list[str], gt_ignore: int | None, producer: str,
                  overwrite: bool = False, jobs: int = 1,
                  progress: Callable[[Any, str], Any] = lambda it, desc: it) -> dict[str, Any]:
    """Check every id's files, then write labels, masks, the manifest and the quality report
    into temporary sibling folders renamed into place at the end. Returns the manifest."""
    source.check()
    plan_output(target.labels, target.masks, overwrite)
    job0 = Job(source, files, num_classes, gt_ignore, target.labels, target.masks)
    problems = Problems()
    for found in progress(parallel_map(_check_task, files.ids, jobs, 16, _init_worker, (job0,)), "check"):
        for kind, message in found:
            problems.add(kind, message)
    problems.raise_any(f"the import of {source.labels} ({source.format}) into {dataset} {split} "
                       f"({len(files.ids)} ids) stopped")

    tmp_labels, tmp_masks = _temp_sibling(target.labels, "import"), _temp_sibling(target.masks, "import")
    try:
        tmp_labels.mkdir(parents=True)
        tmp_masks.mkdir(parents=True)
        job = Job(source, files, num_classes, gt_ignore, tmp_labels, tmp_masks)
        totals = Totals(num_classes)
        for result in progress(parallel_map(_import_task, files.ids, jobs, 16, _init_worker, (job,)), "import"):
            totals.add(result)
        manifest = make_manifest(totals, source, target, dataset=dataset, split=split, producer=producer)
        save_json(tmp_labels / MANIFEST_NAME, manifest)
        quality = quality_report(totals, class_names, dataset=dataset, split=split, producer=producer)
        save_json(tmp_labels / QUALITY_JSON, quality)
        save_text(tmp_labels / QUALITY_MD, render_quality(quality))
        # Masks first: a label folder with its manifest in place means a complete import.
        _install(tmp_masks, target.masks)
        _install(tmp_labels, target.labels)
    finally:
        for tmp in (tmp_labels, tmp_masks):
            if tmp.exists():
                shutil.rmtree(tmp)
    return manifest


# ----------------------------------------------------------------------------- manifest


class Totals:
    """The per-id results summed as they arrive (a list of 10,582 confusion matrices would not
    fit COCO): counts, histogram, file hashes, and the quality report's pixel counts."""

    COUNTS = ("kept_valid", "kept_correct", "unkept_valid", "unkept_correct", "gt_pixels", "gt_kept")

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.ids = 0
        self.pixels = self.kept = self.uncertain_255 = 0
        self.histogram = np.zeros(num_classes, dtype=np.int64)
        self.label_sha256: dict[str, str] = {}
        self.mask_sha256: dict[str, str] = {}
        self.gt_ids = 0
        self.conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
        self.gt_counts = dict.fromkeys(self.COUNTS, 0)

    def add(self, r: dict[str, Any]) -> None:
        self.ids += 1
        self.pixels += r["pixels"]
        self.kept += r["kept"]
        self.uncertain_255 += r["uncertain_255"]
        self.histogram += r["histogram"]
        self.label_sha256[png_name(r["id"])] = r["label_sha256"]
        self.mask_sha256[png_name(r["id"])] = r["mask_sha256"]
        if r["gt"] is not None:
            self.gt_ids += 1
            self.conf += r["gt"]["conf"]
            for k in self.COUNTS:
                self.gt_counts[k] += r["gt"][k]


def make_manifest(t: Totals, source: Source, target: Target, *, dataset: str, split: str,
                  producer: str) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "producer": producer,
        "input_format": source.format,
        "source": source.paths(),
        "dataset": dataset,
        "split": split,
        "num_classes": t.num_classes,
        "rule": source.rule_record(),
        "counts": {"ids": t.ids, "pixels": t.pixels, "kept": t.kept, "uncertain_255": t.uncertain_255},
        "class_histogram": [int(v) for v in t.histogram],
        "kept_share": t.kept / t.pixels if t.pixels else 0.0,
        "mask_dir": target.mask_dir,
        "mask_dir_resolved": str(target.masks.resolve()),
        "files": {"labels": dict(sorted(t.label_sha256.items())), "masks": dict(sorted(t.mask_sha256.items()))},
    }


def read_manifest(label_dir: Path) -> dict[str, Any]:
    path = label_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"no {MANIFEST_NAME} in {label_dir}: these labels were not made by tools/import_labels.py")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is unreadable ({e})") from None


def check_manifest(label_dir: Path, mask_dir: Path, jobs: int = 1) -> None:
    """Raise DataError naming the files (first few, and the count) whose SHA-256 differs from
    ``label_dir``'s manifest, that are missing, or that were added since the import."""
    label_dir, mask_dir = Path(label_dir), Path(mask_dir)
    manifest = read_manifest(label_dir)
    expected = [(label_dir / name, digest) for name, digest in manifest["files"]["labels"].items()]
    expected += [(mask_dir / name, digest) for name, digest in manifest["files"]["masks"].items()]
    missing = [str(p) for p, _ in expected if not p.is_file()]
    present = [(p, d) for p, d in expected if p.is_file()]
    found = dict(parallel_map(_hash_task, [str(p) for p, _ in present], jobs, 64))
    changed = [str(p) for p, d in present if found[str(p)] != d]
    listed = {p for p, _ in expected}
    added = [str(p) for folder in (label_dir, mask_dir) for p in sorted(folder.glob("*.png")) if p not in listed]
    parts = []
    for what, paths in (("changed", changed), ("missing", missing), ("added", added)):
        if paths:
            more = f" (and {len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
            parts.append(f"{len(paths)} {what}: {', '.join(paths[:SHOWN])}{more}")
    if parts:
        raise DataError(f"the pseudo-labels in {label_dir} and masks in {mask_dir} differ from their manifest "
                        f"({label_dir / MANIFEST_NAME}) since the import: {'; '.join(parts)}; import them again")


def _hash_task(path: str) -> tuple[str, str]:
    return path, sha256(Path(path))


# ----------------------------------------------------------------------------- quality report


def _thousands(n: int) -> str:
    return f"{n:,}"


def quality_report(t: Totals, class_names: list[str], *, dataset: str, split: str,
                   producer: str) -> dict[str, Any]:
    """The labels against the ground truth of the ids that have one (no numbers when none has)."""
    n = t.num_classes
    where = f"{_thousands(t.gt_ids)} ids of {split} with ground truth, of {_thousands(t.ids)} imported"
    out: dict[str, Any] = {"producer": producer, "dataset": dataset, "split": split, "ids_imported": t.ids,
                           "ids_with_ground_truth": t.gt_ids, "computed_on": where}
    if not t.gt_ids:
        out["reason"] = f"no id of {split} has a ground-truth file"
        return out
    conf, counts = t.conf, t.gt_counts
    with_miss = segmentation_scores(conf)             # label 255 = a miss of the gt class
    labelled = segmentation_scores(conf[:n, :n])      # label-255 pixels left out (the training card's rule)
    tp = np.diag(conf)[:n].astype(np.float64)
    rows, cols = conf[:n].sum(1).astype(np.float64), conf[:n, :n].sum(0).astype(np.float64)
    per_class = []
    for c in range(n):
        per_class.append({"class": class_names[c], "gt_pixels": int(rows[c]), "labelled_pixels": int(cols[c]),
                          "iou": with_miss["iou"][c],
                          "precision": float(tp[c] / cols[c]) if cols[c] else None,
                          "recall": float(tp[c] / rows[c]) if rows[c] else None})
    precision = mask_precision(counts)
    out.update({
        "pixels_rule": "ground-truth void (255) pixels excluded; label 255 counted as no prediction: a miss "
                       "(false negative) of the ground-truth class, never a false positive",
        "miou": with_miss["miou"], "pixel_acc": with_miss["pixel_acc"],
        "miou_labelled_only": labelled["miou"], "pixel_acc_labelled_only": labelled["pixel_acc"],
        "no_prediction_share": float(conf[:, n].sum() / conf.sum()) if conf.sum() else 0.0,
        "per_class": per_class,
        "kept_precision": precision["kept_precision"], "dropped_precision": precision["unkept_precision"],
        "precision_rule": "over pixels with ground truth (not void) and a label (not 255): the share whose label "
                          "equals the ground truth, among kept (mask 1) and dropped (mask 0) pixels",
        "kept_pixels": counts["kept_valid"], "dropped_labelled_pixels": counts["unkept_valid"],
        "kept_share": counts["gt_kept"] / counts["gt_pixels"] if counts["gt_pixels"] else 0.0,
        "kept_share_rule": "mask-1 pixels among the pixels whose ground truth is not void",
        "confusion": conf.tolist(),
    })
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def render_quality(q: dict[str, Any]) -> str:
    lines = [f"# Pseudo-label quality: {q['producer']} on {q['dataset']} {q['split']}", "",
             f"Computed on {q['computed_on']}.", ""]
    if "reason" in q:
        return "\n".join(lines + [f"No quality numbers: {q['reason']}.", ""])
    lines += [
        f"Pixels: {q['pixels_rule']}.", "",
        "| number | value |", "|---|---|",
        f"| mIoU (label 255 = miss) | {_pct(q['miou'])} |",
        f"| mIoU on labelled pixels only (the training card's rule) | {_pct(q['miou_labelled_only'])} |",
        f"| pixel accuracy (label 255 = miss) | {_pct(q['pixel_acc'])} |",
        f"| share of pixels with no prediction (label 255) | {_pct(q['no_prediction_share'])} |",
        f"| kept share (mask 1 among non-void pixels) | {_pct(q['kept_share'])} |",
        f"| label precision on kept pixels ({_thousands(q['kept_pixels'])}) | {_pct(q['kept_precision'])} |",
        f"| label precision on dropped labelled pixels ({_thousands(q['dropped_labelled_pixels'])}) "
        f"| {_pct(q['dropped_precision'])} |", "",
        f"Label precision: {q['precision_rule']}.", "",
        "Per class (precision: among pixels labelled c; recall and IoU: among ground-truth c pixels, "
        "label 255 a miss; — where there is nothing to divide by):", "",
        "| class | gt pixels | labelled | precision | recall | IoU |", "|---|---:|---:|---:|---:|---:|",
    ]
    for row in q["per_class"]:
        lines.append(f"| {row['class']} | {_thousands(row['gt_pixels'])} | {_thousands(row['labelled_pixels'])} | "
                     f"{_pct(row['precision'])} | {_pct(row['recall'])} | {_pct(row['iou'])} |")
    return "\n".join(lines + [""])


__all__ = ["FORMATS", "RULES", "DEFAULT_BOUNDARY_WIDTH", "DEFAULT_SCORE_THRESHOLD", "MANIFEST_NAME",
           "QUALITY_JSON", "QUALITY_MD", "Source", "Target", "boundary_band", "confidence", "read_source_label",
           "load_scores", "check_one", "import_labels", "read_manifest", "check_manifest", "quality_report",
           "quality_counts", "render_quality"]

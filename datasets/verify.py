"""Read every file of a data set before training starts (``data.verify: full``); the first
stage's preflight is the last section (``first_stage_preflight``).

Building a ``TrainSet`` / ``EvalSet`` only checks that each file exists; its content is
checked when a loader worker reads it. A truncated validation image or a ground truth
with a bad value would then stop a run after a whole training epoch, which is lost.
``verify`` reads every file of every sample up front with the same readers the data
sets use (``datasets/readers.py``), so what passes here is what training will accept:

* image: decodable under ``data.truncated_images``;
* pseudo-label / ground truth: single-channel, values within the class ids (plus the
  void value 255 where the data set has one);
* confidence mask: binary (``read_mask`` refuses a JPEG-compressed mask or a pseudo-label
  given as one);
* pseudo-label and mask together: label 255 (void) only where the mask is 0. An unreliable
  pixel without a class is fine (the co-training terms learn it); a reliable one would be
  trained by no term. The error names the ids, files and pixel counts and what to do;
* sizes: a training sample's label and mask agree with its image when
  ``data.mask_size_mismatch`` is ``error`` (the other policies handle a mismatch), and an
  evaluation sample's ground truth always (``EvalSet`` checks it on every read);
* training supervision as a whole: not every confidence mask empty, not every
  pseudo-label entirely void (either trains on nothing, silently), some foreground pixel
  in some pseudo-label (all background trains a net that scores a "perfect" mIoU against
  labels of its own kind); foreground classes that no pseudo-label uses are logged as a
  WARNING (a small subset of real data may lack a class; a wrong ``data.num_classes`` too);
* evaluation ground truth as a whole: some foreground pixel (an mIoU over background alone
  means nothing).

All bad files are collected and reported together (one ``DataError`` naming the first
few, the full list in ``<data.root>/.verify_report.txt``), so one run finds them all.

Reading is spread over worker processes (``utils.crf.parallel_map``), and every file that
passed is remembered in ``<data.root>/.verify_cache.json`` by its absolute path, byte size
and modification time (ns) together with what it was checked for: a rerun reads only new
or changed files, and is instant when nothing changed. Only files that passed are cached,
so the cache never hides an error; a file whose size or mtime changed is read again.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.build import dataset_entry
from datasets.label_import import MANIFEST_NAME, check_manifest
from datasets.readers import (VOID_UNDER_RELIABLE_ADVICE, DataError, check_sizes, read_image, read_label, read_mask,
                              void_under_reliable, void_under_reliable_problem)
from datasets.segmentation import EvalSet, TrainSet, align_to_image
from utils.crf import available_cores, parallel_map
from utils.distributed import broadcast_object
from utils.io import save_json, save_text
from utils.logs import log
from utils.voc import IGNORE_INDEX

CACHE_NAME = ".verify_cache.json"
REPORT_NAME = ".verify_report.txt"
# Bump when a reader's checks change: files that passed the old checks are read again. (Label
# entries gained a seventh field, their classes, within version 1: a six-field one is read again;
# pseudo-label entries an eighth, what their void pixels were checked against: a seven-field one
# is read again too.)
CACHE_VERSION = 1
SHOWN = 3          # problems named in the error message; the report lists them all
CHUNK = 16         # samples handed to a worker at a time
CLASSES_NAMED = 20  # unused classes named in the warning; the rest by id

Dataset = Union[TrainSet, EvalSet]


# ----------------------------------------------------------------------------- what is read

@dataclass(frozen=True)
class FileCheck:
    """One file of a sample and the check it must pass.

    ``check`` names the check with its parameters (``image``, ``image+truncated``,
    ``label:<classes>:<void>``, ``mask``): a cached pass counts only for the same check, so
    switching ``data.truncated_images`` to ``error`` re-reads the images that passed with
    ``load``.
    """
    role: str        # "image" | "pseudo-label" | "ground truth" | "confidence mask"
    path: str        # absolute
    check: str


@dataclass(frozen=True)
class Settings:
    """What every worker needs once (sent with the pool's initializer, not per task)."""
    num_classes: int
    allow_truncated: bool
    label_ignore: int | None    # void value of the sample's label file (None: every value must be a class)
    sizes_must_agree: bool
    size_policy: str = "error"  # data.mask_size_mismatch of a training set: how label and mask meet the image


@dataclass(frozen=True)
class Dims:
    """Width and height of a file already read (from the cache or a worker); stands in for a
    PIL image in ``readers.check_sizes`` so a size mismatch reads as it does in training."""
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _check_name(role: str, settings: Settings) -> str:
    if role == "image":
        return "image+truncated" if settings.allow_truncated else "image"
    if role == "confidence mask":
        return "mask"
    void = "none" if settings.label_ignore is None else str(settings.label_ignore)
    return f"label:{settings.num_classes}:{void}"


def _sample_plan(dataset: Dataset) -> tuple[Settings, list[str], list[list[FileCheck]]]:
    """The files of every sample, as the data set reads them (``TrainSet.load``,
    ``EvalSet.__getitem__``), and the checks' settings."""
    cfg = dataset.cfg
    if isinstance(dataset, TrainSet):
        settings = Settings(cfg.num_classes, dataset.allow_truncated, IGNORE_INDEX, cfg.mask_size_mismatch == "error",
                            cfg.mask_size_mismatch)
        roles = lambda i: tuple(zip(("image", "pseudo-label", "confidence mask"), dataset.paths(i)))
    elif isinstance(dataset, EvalSet):
        settings = Settings(cfg.num_classes, dataset.allow_truncated, dataset.entry.gt_ignore_index, True)
        if dataset.with_labels:
            roles = lambda i: (("image", dataset.files.image(i)), ("ground truth", dataset.files.gt(i)))
        else:
            roles = lambda i: (("image", dataset.files.image(i)),)
    else:
        raise TypeError(f"verify takes a TrainSet or an EvalSet, got {type(dataset).__name__}")
    names = {role: _check_name(role, settings) for role in ("image", "pseudo-label", "ground truth",
                                                             "confidence mask")}
    plan = [[FileCheck(role, os.path.abspath(path), names[role]) for role, path in roles(i)] for i in dataset.ids]
    return settings, list(dataset.ids), plan


# ----------------------------------------------------------------------------- the cache

def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load_cache(path: Path) -> dict[str, dict[str, str]]:
    """``{directory: {file name: "<bytes> <mtime_ns> <check> <width> <height> <count>[ <classes>[ <pair>]]"}}``,
    ``<classes>`` (labels only) the label values present other than void, comma-separated, ``-`` for none;
    ``<pair>`` (pseudo-labels only) ``-`` when the label has no void pixel, else
    ``<size policy>:<bytes>:<mtime_ns>``: the ``data.mask_size_mismatch`` and the mask its void pixels
    were found unreliable in (another policy or a changed mask has them checked again).

    One string per file keeps the JSON small and quick to write for COCO's 330,000 files. A
    missing, corrupt or older-version file is an empty cache (replaced once a file passes)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION or not isinstance(raw.get("dirs"), dict):
        return {}
    return {d: files for d, files in raw["dirs"].items() if isinstance(files, dict)}


LABEL_ROLES = ("pseudo-label", "ground truth")

Read = tuple[Dims, int, tuple[int, ...]]  # size, count, label values present other than void


def _entry(stat: tuple[int, int], check: str, size: Dims, count: int, classes: tuple[int, ...] | None,
           pair: str | None = None) -> str:
    entry = f"{stat[0]} {stat[1]} {check} {size.width} {size.height} {count}"
    if classes is None:
        return entry
    entry = f"{entry} {','.join(map(str, classes)) or '-'}"
    return entry if pair is None else f"{entry} {pair}"


def _pair_key(policy: str, mask_stat: tuple[int, int] | None) -> str | None:
    return None if mask_stat is None else f"{policy}:{mask_stat[0]}:{mask_stat[1]}"


def _cached(cache: dict[str, dict[str, str]], f: FileCheck, stat: tuple[int, int] | None,
            pair: str | None = None) -> Read | None:
    """The cached (size, count, classes) of ``f`` if the file is unchanged and passed the same check;
    a pseudo-label with void pixels also needs the same ``pair`` (``_pair_key``: policy and mask)."""
    if stat is None:
        return None
    d, name = os.path.split(f.path)
    entry = cache.get(d, {}).get(name)
    parts = entry.split(" ") if isinstance(entry, str) else []
    fields = 8 if f.role == "pseudo-label" else 7 if f.role in LABEL_ROLES else 6
    is_label = f.role in LABEL_ROLES
    if (len(parts) != fields or parts[0] != str(stat[0]) or parts[1] != str(stat[1])
            or parts[2] != f.check):
        return None
    if fields == 8 and parts[7] != "-" and parts[7] != pair:
        return None
    try:
        classes = tuple(int(c) for c in parts[6].split(",")) if is_label and parts[6] != "-" else ()
        return Dims(int(parts[3]), int(parts[4])), int(parts[5]), classes
    except ValueError:
        return None


# ----------------------------------------------------------------------------- the workers

_SETTINGS: Settings | None = None


def _init_worker(settings: Settings) -> None:
    global _SETTINGS
    _SETTINGS = settings


@dataclass
class SampleResult:
    """One sample's outcome: its problems (reader messages, naming id and path), the files it
    read that passed (to cache), and its supervision counts."""
    index: int
    problems: list[str]
    passed: dict[str, str]      # path -> cache entry of a file read now
    files_read: int
    kept: int = 0               # confidence-mask pixels marked reliable
    mask_pixels: int = 0
    labelled: int = 0           # pseudo-label pixels other than 255
    label_pixels: int = 0
    void_reliable: int = 0      # pseudo-label pixels that are 255 where the mask is 1 (refused)
    void_problem: str | None = None  # the problem naming them (see ``verify`` for when it counts)
    classes: tuple[int, ...] = ()  # values of its pseudo-label or ground truth other than void


def _read(f: FileCheck, item_id: str, s: Settings) -> tuple[Read, Image.Image]:
    """Read one file with the data sets' reader; its size, its count (reliable mask pixels,
    non-void label pixels, 0 for an image), a label's values other than its void value, and the
    image read. Raises the reader's DataError."""
    path = Path(f.path)
    if f.role == "image":
        img = read_image(path, item_id, s.allow_truncated)
        return (Dims(img.width, img.height), 0, ()), img
    if f.role == "confidence mask":
        img = read_mask(path, item_id)
        return (Dims(img.width, img.height), int(np.count_nonzero(np.asarray(img))), ()), img
    img = read_label(path, item_id, s.num_classes, f.role, s.label_ignore)
    arr = np.asarray(img)
    values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    classes = tuple(int(v) for v in values if v != s.label_ignore)
    return (Dims(img.width, img.height), int(np.count_nonzero(arr != IGNORE_INDEX)), classes), img


Task = tuple[int, str, list[tuple[FileCheck, "tuple[int, int] | None", "Read | None"]]]


def _one_line(message: str) -> str:
    """The report holds one problem a line, whatever a decoder's message looks like."""
    return " ".join(message.split("\n"))


def _verify_sample(task: Task) -> SampleResult:
    """Check one sample: every file (read now, or its cached result), then their sizes."""
    index, item_id, files = task
    s = _SETTINGS
    result = SampleResult(index, [], {}, 0)
    dims: list[tuple[Dims, str]] = []  # of the files that passed, image first
    read_now: dict[str, Image.Image] = {}  # role -> the file read now (not from the cache)
    for f, stat, entry in files:
        if entry is not None:
            size, count, classes = entry
        else:
            result.files_read += 1
            try:
                (size, count, classes), read_now[f.role] = _read(f, item_id, s)
            except DataError as e:
                result.problems.append(_one_line(str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - any failure to read is this file's problem (e.g. PIL's bomb check)
                result.problems.append(_one_line(f"{f.role} for id '{item_id}' could not be read: {f.path} "
                                                 f"({type(e).__name__}: {e})"))
                continue
            if stat is not None:  # stat taken before the read: a file changed meanwhile is read again next time
                result.passed[f.path] = _entry(stat, f.check, size, count,
                                               classes if f.role in LABEL_ROLES else None)
        dims.append((size, f.path))
        pixels = size.width * size.height
        if f.role == "confidence mask":
            result.kept, result.mask_pixels = count, pixels
        elif f.role == "pseudo-label":
            result.labelled, result.label_pixels = count, pixels
        if f.role in LABEL_ROLES:
            result.classes = classes
    image_ok = bool(dims) and dims[0][1] == files[0][0].path  # sizes are compared with the image's
    sizes_ok = True
    if s.sizes_must_agree and image_ok and len(dims) > 1:
        try:
            check_sizes(item_id, dims[0], *dims[1:])
        except DataError as e:
            result.problems.append(str(e))
            sizes_ok = False
    if "pseudo-label" in read_now:
        _check_pair(result, item_id, files, read_now, dims[0][0] if image_ok and sizes_ok else None, s)
    return result


def _check_pair(result: SampleResult, item_id: str, files: list, read_now: dict[str, Image.Image],
                image: Dims | None, s: Settings) -> None:
    """A pseudo-label read now against its mask: 255 only where the mask is 0. Its cache entry
    records what it passed against (``-`` without void pixels, else the size policy and the mask's
    byte size and mtime);
    one that could not be checked (a bad mask or image, sizes that differ) is not cached."""
    (label_f, _, _), (mask_f, mask_stat, mask_entry) = (
        next(x for x in files if x[0].role == role) for role in ("pseudo-label", "confidence mask"))
    label = read_now["pseudo-label"]
    entry = result.passed.pop(label_f.path, None)
    if entry is None:  # it failed its own check, or changed while being read
        return
    if not (np.asarray(label) == IGNORE_INDEX).any():
        result.passed[label_f.path] = f"{entry} -"
        return
    if image is None:
        return
    mask = read_now.get("confidence mask")
    if mask is None:
        if mask_entry is None:  # read now and refused: that is its problem
            return
        try:  # it passed before (the cache): read it again for the comparison
            mask = read_mask(Path(mask_f.path), item_id)
        except DataError as e:
            result.problems.append(_one_line(str(e)))
            return
        result.files_read += 1
    label, mask = align_to_image(item_id, (image, Path(files[0][0].path)), s.size_policy,
                                 (label, Path(label_f.path)), (mask, Path(mask_f.path)))
    count = void_under_reliable(np.asarray(label), np.asarray(mask))
    if count:
        result.void_reliable = count
        result.void_problem = void_under_reliable_problem(item_id, count, Path(label_f.path), Path(mask_f.path))
    elif mask_stat is not None:
        result.passed[label_f.path] = f"{entry} {_pair_key(s.size_policy, mask_stat)}"


# ----------------------------------------------------------------------------- the check

def _noun(dataset: Dataset, split: str) -> str:
    if isinstance(dataset, TrainSet):
        return "training"
    return {"val": "validation"}.get(split, f"'{split}'")


def verify(dataset: Dataset, *, jobs: int | None = None, progress: bool = True,
           split: str | None = None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Read every file of ``dataset`` (a built ``TrainSet`` or ``EvalSet``) and raise one
    ``DataError`` for all that training or evaluation would fail on.

    ``jobs``: worker processes (default: the cores this process may use), never more than
    the samples to read. ``split`` only names the set in the bar and messages (default
    ``train`` for a TrainSet, ``val`` for an EvalSet). With ``data.verify: exists`` it returns
    at once: building the set has checked existence already.

    ``rank`` / ``world_size``: every rank of a process group calls it and reads samples
    rank, rank + world_size, ...; rank 0 gathers the outcomes, writes the cache and decides
    (the other ranks return a summary of their share and never raise). One rank reading
    COCO's 330,000 files alone could outlast the collective timeout of the ranks waiting.

    Returns a summary: ``mode``, ``split``, ``ids`` (samples checked), ``files``,
    ``files_read``, ``files_cached``, ``jobs``, ``seconds``, ``kept_fraction`` (reliable
    share of all confidence-mask pixels; None without masks) and ``labelled_fraction``
    (non-void share of all pseudo-label pixels; None without pseudo-labels); in ``full`` mode
    also ``unused_classes``: the foreground class ids no pseudo-label uses (logged as a
    warning; None for an evaluation set).

    Raises DataError, besides bad files, when no pseudo-label (or ground-truth map) of the
    set has a single foreground pixel.
    """
    start = time.perf_counter()
    cfg = dataset.cfg
    split = split or ("train" if isinstance(dataset, TrainSet) else "val")
    summary: dict[str, Any] = {"mode": cfg.verify, "split": split, "ids": len(dataset.ids), "files": 0,
                               "files_read": 0, "files_cached": 0, "jobs": 0, "seconds": 0.0,
                               "kept_fraction": None, "labelled_fraction": None}
    if cfg.verify == "exists":
        summary["ids"] = 0
        return summary
    settings, ids, plan = _sample_plan(dataset)
    root = Path(cfg.root)
    cache_path = root / CACHE_NAME
    cache = load_cache(cache_path)

    tasks, done = [], []
    for index, (item_id, files) in enumerate(zip(ids, plan)):
        if index % world_size != rank:
            continue
        stats = [_stat(f.path) for f in files]
        mask_stat = next((st for f, st in zip(files, stats) if f.role == "confidence mask"), None)
        pair = _pair_key(settings.size_policy, mask_stat)
        entries = [(f, st, _cached(cache, f, st, pair)) for f, st in zip(files, stats)]
        task = (index, item_id, entries)
        (done if all(e is not None for _, _, e in entries) else tasks).append(task)
    n_jobs = max(1, min(jobs or available_cores(), len(tasks)))

    results: list[SampleResult] = []
    with tqdm(total=len(ids), desc=f"verify {split}", unit="img", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        _init_worker(settings)  # the cached samples are checked here, without reading a file
        results.extend(_verify_sample(t) for t in done)
        bar.update(len(done))
        if tasks:
            for r in parallel_map(_verify_sample, tasks, n_jobs, CHUNK, _init_worker, (settings,)):
                results.append(r)
                bar.update(1)
    summary["jobs"] = n_jobs if tasks else 0
    if world_size > 1:
        results = _gather_on_main(results, rank, world_size)
        if rank != 0:
            mine = plan[rank::world_size]
            summary.update(ids=len(mine), files=sum(len(files) for files in mine), seconds=time.perf_counter() - start)
            return summary
    results.sort(key=lambda r: r.index)

    _update_cache(cache_path, cache, results)
    summary.update(files=sum(len(files) for files in plan), files_read=sum(r.files_read for r in results))
    summary["files_cached"] = summary["files"] - summary["files_read"]

    # Every pseudo-label entirely void is one mistake (the wrong folder), said below once, not as
    # void pixels under mask 1 in every sample.
    all_void = isinstance(dataset, TrainSet) and all(r.label_pixels and not r.labelled for r in results)
    for r in results:
        if r.void_problem and not all_void:
            r.problems.append(r.void_problem)
    bad = [r for r in results if r.problems]
    if bad:
        raise DataError(_report(root / REPORT_NAME, bad, ids, _noun(dataset, split), split)
                        + _void_under_reliable_summary(results, ids))
    mask_pixels = sum(r.mask_pixels for r in results)
    label_pixels = sum(r.label_pixels for r in results)
    kept, labelled = sum(r.kept for r in results), sum(r.labelled for r in results)
    if isinstance(dataset, TrainSet):
        if kept == 0:
            raise DataError(f"no pixel is marked reliable in any of the {len(ids)} confidence masks under "
                            f"{dataset.mask_dir}: every mask is all 0, so nothing would be trained as reliable; "
                            f"is data.mask_dir ({cfg.mask_dir}) the first stage's mask output?")
        if labelled == 0:
            raise DataError(f"every one of the {len(ids)} pseudo-labels under {dataset.label_dir} is entirely "
                            f"255 (void), so there is no target to train on; is data.pseudo_label_dir "
                            f"({cfg.pseudo_label_dir}) the first stage's pseudo-label output?")
    summary["unused_classes"] = _check_classes(dataset, split, results)
    summary["kept_fraction"] = kept / mask_pixels if mask_pixels else None
    summary["labelled_fraction"] = labelled / label_pixels if label_pixels else None
    summary["seconds"] = time.perf_counter() - start
    return summary


def _check_classes(dataset: Dataset, split: str, results: list[SampleResult]) -> list[int] | None:
    """Refuse a label set without foreground; warn of the foreground classes no training label
    uses (their ids, for the summary). Runs where every sample's result is (rank 0), so one
    decision holds for all ranks."""
    cfg = dataset.cfg
    present = {c for r in results for c in r.classes}
    if isinstance(dataset, EvalSet):
        if dataset.with_labels and not present - {0}:
            raise DataError(f"none of the {len(results)} {_noun(dataset, split)} ground-truth maps under "
                            f"{dataset.files.gt_dir} has a foreground pixel: an mIoU over background alone means "
                            f"nothing; is data.gt_dir ({getattr(cfg, 'gt_dir', None)}) the right folder for split "
                            f"'{split}'?")
        return None
    if not present - {0}:
        raise DataError(f"none of the {len(results)} training pseudo-labels under {dataset.label_dir} has a "
                        f"foreground pixel (every pixel is 0, background, or 255, void): training on them predicts "
                        f"background everywhere and scores a meaningless mIoU; is data.pseudo_label_dir "
                        f"({cfg.pseudo_label_dir}) the first stage's pseudo-label output?")
    unused = sorted(set(range(1, cfg.num_classes)) - present)
    if unused:
        names = dataset_entry(cfg.dataset).class_names(cfg.num_classes)
        listing = ", ".join(f"{c} {names[c]}" for c in unused[:CLASSES_NAMED])
        if len(unused) > CLASSES_NAMED:  # COCO's 80 names would make a line of 1,500 characters
            listing += (f" and {len(unused) - CLASSES_NAMED} more (ids "
                        f"{', '.join(map(str, unused[CLASSES_NAMED:]))})")
        log.warning(f"{len(unused)} of the {cfg.num_classes - 1} foreground classes that data.num_classes "
                    f"({cfg.num_classes}) declares appear in none of the {len(results)} training pseudo-labels "
                    f"under {dataset.label_dir}: {listing} (expected for a small subset of the data; otherwise "
                    f"check data.num_classes and the first stage's output)")
    return unused


def _gather_on_main(results: list[SampleResult], rank: int, world_size: int) -> list[SampleResult]:
    """Every rank's results on rank 0 (an empty list elsewhere)."""
    import torch.distributed as dist
    everyone: list[list[SampleResult] | None] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(results, everyone, dst=0)
    return [r for part in everyone for r in part] if rank == 0 else []


def _update_cache(path: Path, cache: dict[str, dict[str, str]], results: Iterable[SampleResult]) -> None:
    """Add the files that passed now and write the cache, only when there are any.

    A file that failed is never added; an entry of it from an earlier pass no longer matches
    (its size, mtime or check differs, or it would not have been read), so it cannot hide the
    error. A data root that cannot be written (a shared, read-only copy) only loses the cache.
    """
    passed = [(p, entry) for r in results for p, entry in r.passed.items()]
    for p, entry in passed:
        d, name = os.path.split(p)
        cache.setdefault(d, {})[name] = entry
    if passed:
        try:
            save_json(path, {"version": CACHE_VERSION, "dirs": cache})
        except OSError:
            pass


def _void_under_reliable_summary(results: list[SampleResult], ids: list[str]) -> str:
    """The error's closing sentence when some pseudo-labels have 255 under mask 1: how many ids
    and pixels, the first ids, and what to do."""
    hit = [r for r in results if r.void_problem in r.problems]
    if not hit:
        return ""
    pixels = sum(r.void_reliable for r in hit)
    return (f". Label 255 (void) under mask 1 (reliable): {pixels} pixels in {len(hit)} of {len(ids)} samples, ids "
            f"{shown([ids[r.index] for r in hit])}; {VOID_UNDER_RELIABLE_ADVICE}")


def _report(path: Path, bad: list[SampleResult], ids: list[str], noun: str, split: str) -> str:
    """Write every problem to ``path`` (one a line) and return the error message naming the first few."""
    problems = [p for r in bad for p in r.problems]
    head = f"{len(bad)} of {len(ids)} {noun} samples are bad"
    text = (f"# data.verify: {head} ({len(problems)} problems; split '{split}'), one a line:\n"
            + "".join(f"{p}\n" for p in problems))
    try:
        save_text(path, text)
        where = f"full list in {path}"
    except OSError as e:
        where = f"full list not written to {path}: {e}"
    more = len(problems) - SHOWN
    tail = f" (and {more} more; {where})" if more > 0 else f" ({where})"
    return f"{head}: " + "; ".join(problems[:SHOWN]) + tail


def check_import(dataset: Dataset, jobs: int) -> None:
    """Pseudo-labels imported by tools/import_labels.py carry a manifest of their files' SHA-256:
    a label or mask changed, missing or added since the import is refused (DataError)."""
    if isinstance(dataset, TrainSet) and (dataset.label_dir / MANIFEST_NAME).is_file():
        check_manifest(dataset.label_dir, dataset.mask_dir, jobs)


def preflight(sets: list[tuple[Dataset, str]], info) -> None:
    """Read every file of the sets before any work (``data.verify: full``, cached by size and
    mtime, datasets/verify.py): a bad val image is found now, not after an epoch. Every rank
    reads its share of the samples, each with its share of the node's cores; rank 0 decides,
    and every rank stops with its message."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)) if info.distributed else 1
    jobs = max(1, available_cores() // max(local, 1))
    error = None
    for dataset, split in sets:
        try:
            if info.is_main:
                check_import(dataset, jobs)
            summary = verify(dataset, split=split, jobs=jobs, progress=info.is_main, rank=info.rank,
                             world_size=info.world_size)
        except DataError as e:  # rank 0 only
            error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise DataError(error)
        if info.is_main and summary["mode"] == "full":
            log.info(f"verified {summary['ids']} {split} samples: {summary['files_read']} files read, "
                     f"{summary['files_cached']} unchanged since their last check ({summary['seconds']:.1f} s"
                     f"{f', {info.world_size} ranks' if info.distributed else ''})")


# ----------------------------------------------------------------------------- the first stage's preflight
#
# Before any first-stage step starts (first-stage/irn/run_sample.py), the data the chosen steps
# read is checked in full through the run's source (its ids, images, image-level labels and
# ground truth), so a missing or broken file stops the run in seconds, naming the option or the
# first bad id, its file and how many ids fail, instead of a loader worker finding it mid-training:
#
#     the data root      --voc12_root / --coco_root exists (a data error, exit 1)
#     train_cam          images and image-level labels of the train list; of the val list too
#                        with cam_val_loss (the default)
#     make_cam           images and image-level labels of the train list
#     cam_to_ir_label, make_sem_seg   images of the train list
#     train_irn          images of the train and infer lists
#     eval_cam, eval_sem_seg          ground truth of the evaluation ids
#
# Image-level labels: VOC cls_labels.json (--cls_labels) or, for ids it lacks, the XML annotation,
# which must exist and parse; COCO the cls_labels_<split>2014.json of each id. Images without any
# class (COCO has a few hundred) are reported then: count and first ids in the log (a warning),
# under "preflight" in summary.json, every id in <work_dir>/logs/no_class_ids.txt; gen_mask and
# export count them again in their own summary entries.

# step -> (role, what) pairs it reads; "val" only with the CAM validation loss
FIRST_STAGE_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "train_cam": (("train", "images"), ("train", "labels"), ("val", "images"), ("val", "labels")),
    "make_cam": (("train", "images"), ("train", "labels")),
    "cam_to_ir_label": (("train", "images"),),
    "train_irn": (("train", "images"), ("infer", "images")),
    "make_sem_seg": (("train", "images"),),
    "eval_cam": (("eval", "gt"),),
    "eval_sem_seg": (("eval", "gt"),),
}
NO_DATA_STEPS = ("gen_mask", "export")  # read no image of the data set (gen_mask's GT statistics are optional)
SHOWN_IDS = 5          # ids named in the log line
SUMMARY_IDS = 10       # ids kept in summary.json
NO_CLASS_LIST = "no_class_ids.txt"

ROOT_FLAGS = {"voc": "--voc12_root", "coco": "--coco_root"}
ROOT_HINTS = {"voc": "the VOC2012 folder: JPEGImages/, Annotations/, ImageSets/Segmentation/, SegmentationClass/",
              "coco": "tools/prepare_coco.py's tree: train2014/, val2014/, mask/, lists/, cls_labels_*.json"}


def data_root(args: Any) -> tuple[str, Path]:
    """(flag, path) of a first-stage run's data root."""
    return ROOT_FLAGS[args.dataset], Path(args.coco_root if args.dataset == "coco" else args.voc12_root)


def check_root(args: Any) -> None:
    flag, root = data_root(args)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise DataError(f"data root {what}: {flag} {root} ({ROOT_HINTS[args.dataset]})")


def needs(args: Any, steps: Sequence[str]) -> dict[str, list[str]]:
    """role -> what to check ("images", "labels", "gt"), in role order, for the chosen steps."""
    out: dict[str, list[str]] = {}
    for step in steps:
        for role, what in FIRST_STAGE_NEEDS.get(step, ()):
            if role == "val" and not args.cam_val_loss:
                continue
            if what not in out.setdefault(role, []):
                out[role].append(what)
    order = ("train", "val", "infer", "eval")
    return {r: out[r] for r in order if r in out}


def _in_list(source: Any, role: str, error: DataError) -> DataError:
    """The error with its list named first (same type, so a LabelError stays one)."""
    return type(error)(f"{role} list {source.list_path(role)}: {error}")


def first_stage_preflight(args: Any, source: Any, steps: Sequence[str], log: Any) -> dict[str, Any]:
    """Check what ``steps`` read through ``source`` (the run's data source); returns the report
    (checked roles, the ids without class) that summary.json keeps under "preflight"."""
    if any(s not in NO_DATA_STEPS for s in steps):
        check_root(args)
    report: dict[str, Any] = {"checked": {}}
    no_class: list[str] | None = None
    for role, whats in needs(args, steps).items():
        ids = source.ids(role)  # a missing or empty list fails here, naming it
        try:
            if "images" in whats:
                source.check_images(ids)
            if "labels" in whats:
                empty = source.check_labels(ids)
                if role == "train":
                    no_class = empty
            if "gt" in whats:
                source.check_gt(ids)
        except DataError as e:
            raise _in_list(source, role, e) from None
        report["checked"][role] = {"list": str(source.list_path(role)), "ids": len(ids), "checked": whats}
    if no_class is None and any(s in steps for s in ("gen_mask", "export")):
        no_class = known_no_class(source, source.ids("train"))
        if no_class is None:
            log.info("preflight: image-level labels of the train list unavailable; gen_mask counts the images "
                     "without class from the score files")
    if no_class is not None:
        report.update(no_class_report(no_class))
        if no_class:
            policy = policy_text(args.no_class_mask, args.mask_thd)
            log.warning(f"preflight: {no_class_sentence(len(no_class), policy, future=True)}; ids {shown(no_class)}")
            path = Path(args.log_dir) / NO_CLASS_LIST
            path.write_text("".join(f"{i}\n" for i in no_class))
            report["no_class_list"] = str(path)
    return report


def known_no_class(source: Any, ids: Sequence[str]) -> list[str] | None:
    """The ids without any class from the image-level labels; None when they cannot be read
    (outputs exported without the data set's labels)."""
    try:
        return source.check_labels(ids)
    except DataError:
        return None


def no_class_report(ids: Sequence[str]) -> dict[str, Any]:
    return {"no_class_images": len(ids), "no_class_ids": list(ids[:SUMMARY_IDS])}


def shown(ids: Sequence[str], n: int = SHOWN_IDS) -> str:
    return ", ".join(ids[:n]) + (f" ... ({len(ids) - n} more)" if len(ids) > n else "")


def policy_text(mode: str, thd: float) -> str:
    """What the masks of images without class mark, for a --no_class_mask value and --mask_thd."""
    if mode == "zero":
        return "their masks mark no pixel reliable (--no_class_mask zero)"
    share = "half" if thd == 0.5 else f"{100 * thd:g} %"
    return f"their masks mark a seeded random {share} of their pixels reliable (--no_class_mask {mode})"


def no_class_sentence(n: int, policy: str, future: bool = False) -> str:
    """"N images have no class: their pseudo-labels are all background and <policy>"."""
    have = "has" if n == 1 else "have"
    are = "will be" if future else "are"
    return f"{n} image{'' if n == 1 else 's'} {have} no class: their pseudo-labels {are} all background and {policy}"


__all__ = ["verify", "preflight", "load_cache", "CACHE_NAME", "REPORT_NAME", "CACHE_VERSION", "first_stage_preflight",
           "known_no_class", "no_class_report", "no_class_sentence", "policy_text", "shown", "FIRST_STAGE_NEEDS",
           "NO_CLASS_LIST"]

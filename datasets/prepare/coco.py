"""COCO 2014 instances JSON -> the files this project reads (first-stage spec §16.1,
segmenters-and-coco spec §2.1).

For each split (``train``, ``val``) this writes, under the COCO root::

    mask/<split>2014/<int image id>.png      ground truth, uint8 L, 0..80, no void value
    lists/<split>2014.txt                    file stems, one a line, ascending image id
    cls_labels_<split>2014.json              image-level labels (beco-cls-labels-v1), keyed by stem
    prepare_coco.json                        per-split counts and the annotation file's digest

The ground-truth rule is the reference's ``mscoco/annToMask.py``: zeros of the image's
size; the image's non-crowd annotations in annotation order (the order of the JSON's
``annotations`` list), each rasterised by pycocotools and painted with its contiguous
label (category ids in ascending order -> 1..80), later annotations over earlier ones.
Crowd regions and unannotated pixels stay 0 = background. Image-level labels, as the
reference builds them when its ``.npy`` is missing, use **all** annotations, crowd ones
included — so an image whose only annotation is a crowd has an all-zero mask but a
non-empty label.

Masks are written by a process pool in chunks; each file is written atomically, so a
killed run leaves only complete masks and a rerun resumes by skipping them. If the
annotation file's digest differs from the one recorded by the run that wrote the
masks, the existing masks are stale: they are deleted and written again (masks found
without any record, e.g. made by the reference script, are trusted and kept).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from datasets.coco import (CATEGORIES, SPLITS, cls_labels_name, list_name, split_folder, stem_of)
from datasets.prepare.cls_labels import save_cls_labels
from utils import provenance
from utils.errors import DataError
from utils.io import save_json, save_png, save_text

SUMMARY_NAME = "prepare_coco.json"
SUMMARY_FORMAT = "beco-prepare-coco-v1"
FG_NAMES: tuple[str, ...] = tuple(name for _, name in CATEGORIES)  # classification index order
CHUNK = 64  # images per pool task: big enough to amortise IPC, small enough for a smooth bar


class CocoPrepareError(DataError):
    """Bad COCO input; the message names the offending file (and image or annotation id)."""


# ----------------------------------------------------------------------------- pure pieces


def annotation_path(root: str | Path, split: str) -> Path:
    """``<root>/annotations/instances_<split>2014.json``."""
    return Path(root) / "annotations" / f"instances_{split_folder(split)}.json"


def category_map(categories: Iterable[Mapping[str, Any]]) -> dict[int, int]:
    """COCO category id -> contiguous label id 1..N, in ascending order of category id.

    This is the reference's ``category_map`` literal, derived instead of hard-coded, so a
    JSON with the standard 80 categories gives 1->1 ... 13->12, 27->25 ... 90->80.
    """
    ids = sorted(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return {cat: k + 1 for k, cat in enumerate(ids)}


def check_categories(categories: Sequence[Mapping[str, Any]], source: str | Path) -> None:
    """The JSON's categories must be COCO's 80 (ids and names): the label ids, the class
    names in the label files and the 81-class networks all assume exactly that table."""
    got = sorted((int(c["id"]), str(c["name"])) for c in categories)
    want = sorted(CATEGORIES)
    if got != want:
        extra = sorted(set(got) - set(want))[:5]
        missing = sorted(set(want) - set(got))[:5]
        raise CocoPrepareError(
            f"{source}: categories are not COCO's 80 (id, name) pairs: {len(got)} given; "
            f"unexpected {extra or 'none'}; missing {missing or 'none'}")


def ann_to_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Binary (height, width) uint8 mask of one annotation, as ``COCO.annToMask`` makes it.

    Polygons (a list of ``[x0, y0, x1, y1, ...]``, parts merged), uncompressed RLE
    (``counts`` a list) and compressed RLE (``counts`` a str/bytes) are handled like
    pycocotools' ``annToRLE``; it is re-stated here so that pool workers only need the
    image's size, not the whole ``COCO`` index. An empty polygon list gives an empty mask
    (pycocotools would fail on it).
    """
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    if isinstance(segm, list):
        if not segm:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    m = mask_utils.decode(rle)
    if m.shape != (height, width):
        raise ValueError(f"annotation {ann.get('id')}: segmentation is {m.shape[0]}x{m.shape[1]}, "
                         f"image is {height}x{width}")
    return m


def annotations_to_mask(anns: Iterable[Mapping[str, Any]], height: int, width: int,
                        cat_map: Mapping[int, int],
                        rasterise: Callable[[Mapping[str, Any]], np.ndarray] | None = None) -> np.ndarray:
    """Ground truth of one image by the reference rule (first-stage spec §16.1).

    ``anns`` in annotation order; crowd ones (``iscrowd`` = 1) are skipped; each other one
    is rasterised by ``rasterise(ann)`` (default: :func:`ann_to_mask` at this size)
    and painted with ``cat_map[category_id]``, so later annotations overwrite earlier
    ones. Returns uint8 (height, width), 0 = background (no void value).
    """
    fn = rasterise or (lambda a: ann_to_mask(a, height, width))
    out = np.zeros((height, width), np.uint8)
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        label = cat_map[int(ann["category_id"])]
        m = np.asarray(fn(ann))
        if m.shape != (height, width):
            raise ValueError(f"annotation {ann.get('id')}: mask is {m.shape}, image is {(height, width)}")
        out[m > 0] = label
    return out


def image_labels(anns: Iterable[Mapping[str, Any]], cat_map: Mapping[int, int]) -> list[int]:
    """Ascending 0-based classification indices (label id - 1) of **all** annotations,
    crowd included, as the reference builds its label matrix."""
    return sorted({cat_map[int(a["category_id"])] - 1 for a in anns})


def default_workers() -> int:
    """All cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- pool workers

_WORKER: dict[str, Any] = {}


def _init_worker(mask_dir: str, cat_map: dict[int, int], source: str) -> None:
    _WORKER.update(mask_dir=Path(mask_dir), cat_map=cat_map, source=source)


def _write_chunk(tasks: list[tuple[int, int, int, list[dict]]]) -> int:
    """Write the masks of (image id, height, width, annotations) tasks; returns how many."""
    mask_dir, cat_map = _WORKER["mask_dir"], _WORKER["cat_map"]
    for image_id, h, w, anns in tasks:
        try:
            mask = annotations_to_mask(anns, h, w, cat_map)
        except Exception as e:  # noqa: BLE001 - pycocotools raises bare exceptions; name the image
            raise CocoPrepareError(f"{_WORKER['source']}: image id {image_id}: cannot rasterise "
                                   f"its annotations: {e}") from None
        save_png(mask_dir / f"{image_id}.png", mask)
    return len(tasks)


# ----------------------------------------------------------------------------- one split


def _load(path: Path) -> Any:
    """pycocotools' COCO index of ``path``, its chatter kept off stdout."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise CocoPrepareError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoPrepareError(f"{path} is not valid JSON: {e}") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise CocoPrepareError(f"{path} is not a COCO instances file: {e!r}") from None


def _first_of(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _validate(coco: Any, root: Path, split: str, path: Path, cat_map: dict[int, int]) -> list[int]:
    """Image ids ascending, after checking names, image files and annotation references."""
    images = coco.dataset.get("images", [])
    if len(coco.imgs) != len(images):
        seen: set[int] = set()
        for im in images:
            if int(im["id"]) in seen:
                raise CocoPrepareError(f"{path}: image id {im['id']} appears more than once")
            seen.add(int(im["id"]))
    folder = root / split_folder(split)
    problems = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        want = stem_of(split, image_id) + ".jpg"
        if info.get("file_name") != want:
            problems.append(f"{path}: image id {image_id} has file_name {info.get('file_name')!r}, "
                            f"expected {want!r}")
        elif not (folder / want).is_file():
            problems.append(f"image file missing for image id {image_id}: {folder / want}")
        else:
            problems.extend(_size_problem(path, image_id, info, folder / want))
    if problems:
        raise CocoPrepareError(_first_of(problems))
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] not in coco.imgs:
            raise CocoPrepareError(f"{path}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
        if int(ann["category_id"]) not in cat_map:
            raise CocoPrepareError(f"{path}: annotation {ann.get('id')} (image {ann['image_id']}) "
                                   f"has unknown category id {ann['category_id']}")
        _check_polygons(path, ann)
    return sorted(coco.imgs)


def _size_problem(path: Path, image_id: int, info: Mapping[str, Any], image_file: Path) -> list[str]:
    """The JSON's height and width against the image file's header: the mask is drawn at the
    JSON's size, so a disagreement would give every training sample a misaligned ground truth."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(image_file) as img:  # the header only, not the pixels
            width, height = img.size
    except (OSError, UnidentifiedImageError) as e:
        return [f"image file for image id {image_id} is unreadable: {image_file} ({e})"]
    if (int(info["width"]), int(info["height"])) != (width, height):
        return [(f"{path}: image id {image_id} is {info['width']}x{info['height']} (width x height) there, "
                 f"but its image file is {width}x{height}: {image_file}")]
    return []


def _check_polygons(path: Path, ann: Mapping[str, Any]) -> None:
    """Every polygon of a rasterised (non-crowd) annotation has x, y pairs of at least 3 points.

    pycocotools takes a 4-number polygon for a box and fails on fewer with a bare exception;
    neither spec gives a rule for such polygons, so they are refused, not guessed at. Crowd
    annotations are never rasterised (the mask rule skips them) and are not checked."""
    segm = ann.get("segmentation")
    if ann.get("iscrowd", 0) or not isinstance(segm, list):
        return
    for part in segm:
        n = len(part) if isinstance(part, list) else None
        if n is None or n < 6 or n % 2:
            what = f"{n} numbers" if n is not None else f"a {type(part).__name__} instead of a list"
            raise CocoPrepareError(f"{path}: annotation {ann.get('id')} (image id {ann['image_id']}) has a polygon "
                                   f"of {what}; a polygon is x, y pairs of at least 3 points")


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img")


def _read_summary(root: Path) -> dict:
    path = root / SUMMARY_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") == SUMMARY_FORMAT:
                return data
        except json.JSONDecodeError:
            pass
    return {"format": SUMMARY_FORMAT, "splits": {}}


def _record(root: Path, split: str, entry: dict) -> None:
    data = _read_summary(root)
    data["splits"][split] = entry
    save_json(root / SUMMARY_NAME, data)


def prepare_split(root: str | Path, split: str, *, workers: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Masks, id list and image-level labels of one split; returns its counts."""
    root = Path(root)
    path = annotation_path(root, split)
    coco = _load(path)
    check_categories(coco.dataset.get("categories", []), path)
    cat_map = category_map(coco.dataset["categories"])
    ids = _validate(coco, root, split, path, cat_map)
    digest = provenance.sha256(path)

    previous = _read_summary(root)["splits"].get(split, {})
    mask_dir = root / "mask" / split_folder(split)
    # By hash alone: the tree is the same bytes wherever it is built.
    record = provenance.make_record("tools/prepare_coco.py", {"annotations": {"sha256": digest}},
                                    {"split": split, "format": SUMMARY_FORMAT})
    if previous.get("annotation_sha256") and provenance.read_record(mask_dir / provenance.RECORD_NAME) is None \
            and mask_dir.is_dir():  # a tree prepared before utils/provenance.py: its summary was the record
        save_json(mask_dir / provenance.RECORD_NAME, provenance.make_record(
            "tools/prepare_coco.py", {"annotations": {"sha256": previous["annotation_sha256"]}}, record["settings"]))
    # The masks are a pure function of the annotation file: another file's masks are redone, not refused.
    plan = provenance.plan(mask_dir, record, ("*.png",), overwrite=overwrite, redo_stale=True)
    stale = plan.action == "replace" and not overwrite
    if (plan.reuse and previous.get("complete")
            and (root / "lists" / list_name(split)).is_file() and (root / cls_labels_name(split)).is_file()
            and all((mask_dir / f"{i}.png").is_file() for i in ids)):
        # Finished before from this very file: everything it would write is there already.
        return {**previous, "masks_written": 0, "masks_kept": len(ids), "up_to_date": True}
    # Old masks go first, then the record: a rerun after a kill finds only masks of this file
    # and resumes by writing the missing ones.
    provenance.commit(plan)
    for tmp in mask_dir.glob(".*.png.*.tmp"):  # left by a run killed mid-write
        tmp.unlink(missing_ok=True)
    # Recorded before any mask is written: a killed run's masks are known to come from this file.
    _record(root, split, {"annotation_sha256": digest, "complete": False})
    todo = [i for i in ids if not (mask_dir / f"{i}.png").is_file()]
    tasks = [(i, int(coco.imgs[i]["height"]), int(coco.imgs[i]["width"]), coco.imgToAnns.get(i, []))
             for i in todo]
    chunks = [tasks[k:k + CHUNK] for k in range(0, len(tasks), CHUNK)]
    n_workers = min(workers or default_workers(), len(chunks))
    with _progress_bar(len(tasks), f"masks {split_folder(split)}", progress) as bar:
        if n_workers <= 1:
            _init_worker(str(mask_dir), cat_map, str(path))
            for chunk in chunks:
                n = _write_chunk(chunk)
                if bar is not None:
                    bar.update(n)
        else:
            import multiprocessing as mp
            with mp.Pool(n_workers, initializer=_init_worker,
                         initargs=(str(mask_dir), cat_map, str(path))) as pool:
                for n in pool.imap_unordered(_write_chunk, chunks):
                    if bar is not None:
                        bar.update(n)
    missing = [i for i in ids if not (mask_dir / f"{i}.png").is_file()]
    if missing:
        raise CocoPrepareError(_first_of([f"mask missing after writing for image id {i}: {mask_dir / f'{i}.png'}"
                                          for i in missing]))

    stems = [stem_of(split, i) for i in ids]
    save_text(root / "lists" / list_name(split), "".join(f"{s}\n" for s in stems))
    labels = {s: image_labels(coco.imgToAnns.get(i, []), cat_map) for s, i in zip(stems, ids)}
    save_cls_labels(root / cls_labels_name(split), labels, FG_NAMES)

    anns = coco.dataset.get("annotations", [])
    entry = {
        "complete": True,
        "annotation_file": str(path.relative_to(root)),
        "annotation_sha256": digest,
        "images": len(ids),
        "annotations": len(anns),
        "crowd_annotations": sum(1 for a in anns if a.get("iscrowd", 0)),
        "images_without_annotations": sum(1 for i in ids if not coco.imgToAnns.get(i)),
        # crowd-only images included: their mask is all background
        "images_without_mask_pixels": sum(
            1 for i in ids if not any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, []))),
        "masks_written": len(todo),
        "masks_kept": len(ids) - len(todo),
        "stale_masks_rewritten": stale,
        "up_to_date": False,
        "mask_dir": str(mask_dir.relative_to(root)),
        "list": str((root / "lists" / list_name(split)).relative_to(root)),
        "cls_labels": cls_labels_name(split),
    }
    _record(root, split, entry)
    return entry


def prepare_coco(root: str | Path, splits: Sequence[str] = SPLITS, *, workers: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Prepare every split of ``splits`` under the COCO root ``root``.

    Args:
        root: folder with ``annotations/instances_<split>2014.json`` and ``<split>2014/`` images.
        splits: any of ``train``, ``val``.
        workers: processes writing masks (default: every core available; 1 = in process).
        overwrite: rewrite masks that already exist (otherwise kept, so a rerun resumes).
        progress: tqdm bars.

    Returns:
        ``{"format": ..., "splits": {split: counts}}``: per split the images, annotations,
        crowd annotations, images without annotations, masks written / kept of this run.
        ``<root>/prepare_coco.json`` holds the same for the run that last wrote each split;
        a split already complete from the same annotation file is not rewritten at all
        (``up_to_date`` true, every mask counted as kept).

    Raises:
        CocoPrepareError: missing or malformed annotation file, categories other than COCO's
            80, an image whose file is missing or misnamed, an annotation of an unknown image
            or category (the message names the file and the id).
    """
    root = Path(root)
    for s in splits:
        if s not in SPLITS:
            raise CocoPrepareError(f"unknown COCO split {s!r}; expected some of {SPLITS}")
    if not root.is_dir():
        raise CocoPrepareError(f"COCO root not found: {root}")
    for s in splits:  # every input checked before a long run starts
        if not annotation_path(root, s).is_file():
            raise CocoPrepareError(f"annotation file not found: {annotation_path(root, s)}")
    out = {"format": SUMMARY_FORMAT, "splits": {}}
    for s in splits:
        out["splits"][s] = prepare_split(root, s, workers=workers, overwrite=overwrite, progress=progress)
    return out


__all__ = ["SUMMARY_NAME", "FG_NAMES", "CocoPrepareError", "annotation_path", "category_map",
           "check_categories", "ann_to_mask", "annotations_to_mask", "image_labels", "default_workers",
           "prepare_split", "prepare_coco"]

"""Checks the driver runs before the first step, and the report on images without any class.

Before any step starts, the data the chosen steps read is checked in full, so a missing or
broken file stops the run in seconds with a message naming the flag or the first bad id, its
file and how many ids fail, instead of a loader worker finding it mid-training:

    the data root      --voc12_root / --coco_root exists (a data error, exit 1)
    train_cam          images and image-level labels of the train list; of the val list too
                       with --cam_val_loss (the default)
    make_cam           images and image-level labels of the train list
    cam_to_ir_label, make_sem_seg   images of the train list
    train_irn          images of the train and infer lists
    eval_cam, eval_sem_seg          ground truth of the evaluation ids

Before the data, the options of IRN's paths: the ``--radius`` paths must fit the stride-4 map
of an ``--irn_crop_size`` crop, whose network and label maps must agree, and both radii must
be >= 2 (``check_path_options``, an option error, exit 2).

Image-level labels: VOC ``cls_labels.json`` (``--cls_labels``) or, for ids it lacks, the XML
annotation, which must exist and parse; COCO the ``cls_labels_<split>2014.json`` of each id.

Images without any class (an image-level label with no class; COCO has a few hundred) are
reported before work starts: count and first ids in the log (a warning), under "preflight" in
summary.json, every id in ``<work_dir>/logs/no_class_ids.txt``. gen_mask and export count them
again in their own summary entries.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from misc.errors import DataError, OptionError

# step -> (role, what) pairs it reads; "val" only with --cam_val_loss
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "train_cam": (("train", "images"), ("train", "labels"), ("val", "images"), ("val", "labels")),
    "make_cam": (("train", "images"), ("train", "labels")),
    "cam_to_ir_label": (("train", "images"),),
    "train_irn": (("train", "images"), ("infer", "images")),
    "make_sem_seg": (("train", "images"),),
    "eval_cam": (("eval", "gt"),),
    "eval_sem_seg": (("eval", "gt"),),
}
# Steps that read no image of the data set (gen_mask's GT statistics are optional).
NO_DATA_STEPS = ("gen_mask", "export")
SHOWN_IDS = 5          # ids named in the log line
SUMMARY_IDS = 10       # ids kept in summary.json
NO_CLASS_LIST = "no_class_ids.txt"

ROOT_FLAGS = {"voc": "--voc12_root", "coco": "--coco_root"}
ROOT_HINTS = {"voc": "the VOC2012 folder: JPEGImages/, Annotations/, ImageSets/Segmentation/, SegmentationClass/",
              "coco": "tools/prepare_coco.py's tree: train2014/, val2014/, mask/, lists/, cls_labels_*.json"}


def data_root(args: Any) -> tuple[str, Path]:
    """(flag, path) of the run's data root."""
    dataset = getattr(args, "dataset", "voc") or "voc"
    return ROOT_FLAGS[dataset], Path(args.coco_root if dataset == "coco" else args.voc12_root)


def check_root(args: Any) -> None:
    flag, root = data_root(args)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise DataError(f"data root {what}: {flag} {root} ({ROOT_HINTS[getattr(args, 'dataset', 'voc') or 'voc']})")


def needs(args: Any, steps: Sequence[str]) -> dict[str, list[str]]:
    """role -> what to check ("images", "labels", "gt"), in role order, for the chosen steps."""
    out: dict[str, list[str]] = {}
    for step in steps:
        for role, what in NEEDS.get(step, ()):
            if role == "val" and not getattr(args, "cam_val_loss", True):
                continue
            if what not in out.setdefault(role, []):
                out[role].append(what)
    order = ("train", "val", "infer", "eval")
    return {r: out[r] for r in order if r in out}


def _in_list(source: Any, role: str, error: DataError) -> DataError:
    """The error with its list named first (same type, so a LabelError stays one)."""
    return type(error)(f"{role} list {source.list_path(role)}: {error}")


def preflight(args: Any, steps: Sequence[str], log: Any) -> dict[str, Any]:
    """Check what ``steps`` read; returns the report (checked roles, the ids without class)."""
    from datasets.views import data_source
    if any(s not in NO_DATA_STEPS for s in steps):
        check_root(args)
    source = data_source(args)
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
        no_class = known_no_class(args, source.ids("train"), source)
        if no_class is None:
            log.info("preflight: image-level labels of the train list unavailable; gen_mask counts the images "
                     "without class from the score files")
    if no_class is not None:
        report.update(no_class_report(no_class))
        if no_class:
            log.warning(f"preflight: {no_class_sentence(len(no_class), policy_text(args), future=True)}; "
                        f"ids {shown(no_class)}")
            path = Path(args.log_dir) / NO_CLASS_LIST
            path.write_text("".join(f"{i}\n" for i in no_class))
            report["no_class_list"] = str(path)
    return report


# ----------------------------------------------------------------------------- options of the paths


def _path_reach(flag: str, radius: int) -> int:
    # The path index's own reach and its rule for the radius, so the option check cannot drift from it.
    from datasets.affinity import _reach
    try:
        return _reach(radius)
    except ValueError as e:
        raise OptionError(f"{flag}: {e}") from None


def _crop_maps(crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(IRN's output map, its affinity labels' map) of a square training crop."""
    # The stem's and max-pool's ceil(H/4): IRN's output size, as make_cam's.
    from step.make_cam import stride4_size
    from datasets.views import reduced_size
    return stride4_size(crop, crop), reduced_size(crop)


def _crop_works(crop: int, reach: int) -> bool:
    out, labels = _crop_maps(crop)
    # PathIndex.window: every path from a source stays inside the map, reach rows below it and
    # reach columns either side, so the map needs 2 reach + 1 columns.
    return out == labels and labels[1] >= 2 * reach + 1


def irn_crop_problem(crop: int, radius: int) -> str | None:
    """Why train_irn cannot train on ``crop`` with paths of ``radius``, naming the crops and
    radii that would; None when it can."""
    reach = _path_reach("--radius", radius)
    out, labels = _crop_maps(crop)
    if labels[1] < 2 * reach + 1:
        smallest = next(c for c in itertools.count(crop + 1) if _crop_works(c, reach))
        largest = 1  # the reach grows with the radius: the largest that fits is below the first that does not
        while largest + 1 < radius and _crop_works(crop, _path_reach("--radius", largest + 1)):
            largest += 1
        return (f"--irn_crop_size {crop} is too small for --radius {radius}: IRN trains on the crop's stride-4 map "
                f"({labels[0]}x{labels[1]}), and paths of radius {radius} need it at least {2 * reach + 1} wide; use "
                f"--irn_crop_size >= {smallest}" + (f" or --radius <= {largest}" if largest >= 2 else ""))
    if out != labels:
        below = next((c for c in range(crop - 1, 0, -1) if _crop_works(c, reach)), None)
        above = next(c for c in itertools.count(crop + 1) if _crop_works(c, reach))
        return (f"--irn_crop_size {crop}: IRN's stride-4 map of a {crop}-pixel crop is {out[0]}x{out[1]}, its "
                f"affinity labels {labels[0]}x{labels[1]} (crop/4 rounded half to even); use --irn_crop_size "
                + (f"{below} or {above}" if below else f"{above}"))
    return None


def check_path_options(args: Any) -> None:
    """The radii and the IRN crop of the steps that will run, before any step: each failed only
    in its own step (train_irn after three steps, make_sem_seg after five)."""
    if "train_irn" in args.steps:
        problem = irn_crop_problem(args.irn_crop_size, args.radius)
        if problem:
            raise OptionError(problem)
    if "make_sem_seg" in args.steps:
        _path_reach("--rw_radius", args.rw_radius)


def known_no_class(args: Any, ids: Sequence[str], source: Any = None) -> list[str] | None:
    """The ids without any class from the image-level labels; None when they cannot be read
    (outputs exported without the data set's labels)."""
    if source is None:
        from datasets.views import data_source
        source = data_source(args)
    try:
        return source.check_labels(ids)
    except DataError:
        return None


def no_class_report(ids: Sequence[str]) -> dict[str, Any]:
    return {"no_class_images": len(ids), "no_class_ids": list(ids[:SUMMARY_IDS])}


def shown(ids: Sequence[str], n: int = SHOWN_IDS) -> str:
    return ", ".join(ids[:n]) + (f" ... ({len(ids) - n} more)" if len(ids) > n else "")


def policy_text(args_or_mode: Any, thd: float | None = None) -> str:
    """What the masks of images without class mark, for a --no_class_mask value."""
    mode = args_or_mode if isinstance(args_or_mode, str) else getattr(args_or_mode, "no_class_mask", "random_half")
    if thd is None:
        thd = 0.5 if isinstance(args_or_mode, str) else float(getattr(args_or_mode, "mask_thd", 0.5))
    if mode == "zero":
        return "their masks mark no pixel reliable (--no_class_mask zero)"
    share = "half" if thd == 0.5 else f"{100 * thd:g} %"
    return f"their masks mark a seeded random {share} of their pixels reliable (--no_class_mask {mode})"


def no_class_sentence(n: int, policy: str, future: bool = False) -> str:
    """"N images have no class: their pseudo-labels are all background and <policy>"."""
    have = "has" if n == 1 else "have"
    are = "will be" if future else "are"
    return f"{n} image{'' if n == 1 else 's'} {have} no class: their pseudo-labels {are} all background and {policy}"


__all__ = ["preflight", "check_root", "needs", "data_root", "known_no_class", "no_class_report", "policy_text",
           "no_class_sentence", "shown", "check_path_options", "irn_crop_problem", "NEEDS", "NO_CLASS_LIST"]

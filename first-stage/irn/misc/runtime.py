"""Runtime plumbing shared by the steps: logger, progress bars, device, work splitting, metrics."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np
import torch

from utils.metrics import confusion_matrix

LOGGER_NAME = "first_stage"
T = TypeVar("T")


def get_logger() -> logging.Logger:
    """The pipeline logger; the driver attaches the console and ``<work_dir>/log.txt`` handlers.

    Without the driver (tests, library use) messages go to stderr at INFO level.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
    return logger


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             unit: str = "img", position: int | None = None) -> Iterable[T]:
    """A tqdm bar (stderr) per step; plain iteration when disabled."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, position=position,
                leave=position in (None, 0))


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} requested but CUDA is not available")
    return dev


def round_robin(items: Sequence[T], n_parts: int, part: int) -> list[T]:
    """Part ``p`` of ``n`` gets items p, p+n, p+2n, … (the reference's split, §1)."""
    return list(items[part::n_parts])


def worker_share(device_name: str, part: int, n_parts: int, items: Sequence[T]) -> tuple[torch.device, list[T]]:
    """The device and the round-robin share of ``items`` of inference worker ``part``.

    With several GPUs worker p drives GPU p; results do not depend on the split.
    """
    device = resolve_device(device_name)
    if device.type == "cuda" and n_parts > 1:
        device = torch.device("cuda", part)
        torch.cuda.set_device(device)
    return device, round_robin(items, n_parts, part)


def run_on_devices(work: Any, args: Any, ids: list) -> None:
    """Call ``work(part, n_parts, args, ids)`` once per visible GPU (spawned), or once in-process."""
    device = resolve_device(args.device)
    n_parts = torch.cuda.device_count() if device.type == "cuda" and args.device in ("auto", "cuda") else 1
    if n_parts > 1:
        torch.multiprocessing.spawn(work, nprocs=n_parts, args=(n_parts, args, ids), join=True)
    else:
        work(0, 1, args, ids)


def first_item(batch: list) -> Any:
    """collate_fn for batch size 1 with variable-size multi-scale items."""
    return batch[0]


def confusion(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore: int = -1) -> np.ndarray:
    """(n, n) int64 counts ``conf[gt, pred]`` over pixels whose gt is not ``ignore``."""
    if gt.shape != pred.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    return confusion_matrix(torch.from_numpy(np.ascontiguousarray(pred)).long(),
                            torch.from_numpy(np.ascontiguousarray(gt)).long(), n_classes,
                            ignore_index=ignore).numpy()


def iou_scores(conf: np.ndarray) -> dict[str, Any]:
    """chainercv's rule (§8): IoU_c = tp/(row + col − tp); mIoU = nan-mean over all classes
    (background included), so classes absent from both GT and prediction do not count."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    valid = ~np.isnan(iou)
    return {"miou": float(np.nanmean(iou)) if valid.any() else float("nan"),
            "iou": [None if np.isnan(v) else float(v) for v in iou]}




def read_ids(args: Any, list_attr: str) -> list[str]:
    """Ids of the list file ``getattr(args, list_attr)`` (e.g. "train_list"), cut to
    ``args.max_images`` when set (smoke runs)."""
    from voc12.dataloader import load_id_list
    ids = load_id_list(getattr(args, list_attr))
    limit = getattr(args, "max_images", None)
    return ids[:limit] if limit else ids


def eval_ids(args: Any) -> list[str]:
    """Ids of the evaluation split ``<voc12_root>/ImageSets/Segmentation/<chainer_eval_set>.txt``.

    With ``--max_images`` only those ids that are also in the (cut) train list are kept, so a
    smoke run evaluates exactly the images it produced outputs for.
    """
    from voc12.dataloader import load_id_list
    ids = load_id_list(Path(args.voc12_root) / "ImageSets" / "Segmentation" / f"{args.chainer_eval_set}.txt")
    if getattr(args, "max_images", None):
        kept = set(read_ids(args, "train_list"))
        ids = [i for i in ids if i in kept]
    return ids


__all__ = ["get_logger", "progress", "resolve_device", "round_robin", "confusion", "iou_scores", "read_ids",
           "eval_ids", "LOGGER_NAME"]

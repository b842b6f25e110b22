"""The score maps ``main.py --test`` saves and ``test.py`` reads: one reader and one writer
for both formats.

- ``dense``: ``<id>.npy``, the averaged ``pre_logits`` (C, h, w), float32 or float16 (the
  reference's format; 81 x 128 x 128 float32 is 5.3 MB per COCO image, 215 GB for val2014).
- ``compact``: ``<id>.npz`` with only the classes that matter in the image: every class
  whose softmax probability reaches ``threshold`` at some pixel (and every class that wins
  a pixel), at most ``max_classes`` of them (the highest peaks), their logits (float16 or
  float32, ``test.logits_dtype``) minus each pixel's top logit (softmax and arg-max ignore a per-pixel shift, and the
  bilinear upsampling is linear, so the shift never matters), plus one plane ``rest`` =
  log-sum-exp of the dropped classes' logits, so the softmax over (kept, rest) gives the
  kept classes the probabilities they have among all C.
  A COCO image shows a handful of classes, so val2014 needs a few GB instead of 215
  (the bound is printed before a test starts).

Labels from a float32 compact map are those of the dense float32 one wherever the dropped
classes are negligible (probability below ``threshold`` everywhere): the arg-max never picks
a dropped class, and the CRF, which runs over the classes above its own pruning threshold
anyway (utils/crf.py), sees the same unaries. float16 halves the disk again and can flip a
pixel where two classes tie to within its rounding (measured in tests/cli/test_coco_pipeline.py).

numpy only: test.py's worker processes import this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import DataError
from utils.io import atomic_write, save_npy

FORMATS = ("dense", "compact")
SUFFIX = {"dense": ".npy", "compact": ".npz"}


class ScoreMapError(DataError):
    """An unreadable or mismatched saved map; the message names the id and the file."""


@dataclass
class ScoreMap:
    """``logits`` (K, h, w) float32 of the labels ``classes`` (K,); ``rest`` (h, w) the
    log-sum-exp of the other labels' logits, or None when every label is kept (dense)."""
    classes: np.ndarray
    logits: np.ndarray
    rest: np.ndarray | None
    num_classes: int
    dropped_peak: float = 0.0  # the highest probability any dropped class reaches


def _logsumexp(x: np.ndarray, axis: int = 0) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def kept_classes(logits: np.ndarray, threshold: float, max_classes: int) -> np.ndarray:
    """Sorted labels whose softmax peak reaches ``threshold``, plus every pixel winner; when
    more than ``max_classes``, those with the highest peaks (winners first)."""
    x = logits.astype(np.float32)
    prob = np.exp(x - _logsumexp(x)[None])
    peak = prob.reshape(prob.shape[0], -1).max(axis=1)
    winners = np.unique(x.argmax(axis=0))
    peak_rank = peak.copy()
    peak_rank[winners] += 2.0  # above any probability: winners are never cut
    candidates = np.flatnonzero((peak >= threshold) | np.isin(np.arange(len(peak)), winners))
    if len(candidates) > max_classes:
        candidates = candidates[np.argsort(-peak_rank[candidates], kind="stable")[:max_classes]]
    return np.sort(candidates).astype(np.int64)


def compact(logits: np.ndarray, threshold: float, max_classes: int, dtype: str = "float16") -> dict[str, np.ndarray]:
    """The compact record of a dense (C, h, w) map (see the module docstring)."""
    # Relative to each pixel's top logit: softmax and arg-max do not change, and float16 is
    # finest near 0, where the top classes of a close call are (absolute float16 logits flip
    # near-ties: 1 pixel in 12 synthetic COCO images did).
    x = logits.astype(np.float32)
    x = x - x.max(axis=0, keepdims=True)
    keep = kept_classes(x, threshold, max_classes)
    dropped = np.setdiff1d(np.arange(x.shape[0]), keep)
    rest = _logsumexp(x[dropped]) if len(dropped) else np.full(x.shape[1:], -np.inf, np.float32)
    # The highest probability a dropped class reaches: test.py counts the images where the
    # cap dropped a class the CRF would have kept (their CRF labels may then differ).
    dropped_peak = float(np.exp(x[dropped] - _logsumexp(x)[None]).max()) if len(dropped) else 0.0
    return {"classes": keep.astype(np.int16), "logits": x[keep].astype(dtype),
            "rest": rest.astype(dtype), "num_classes": np.int16(x.shape[0]),
            "dropped_peak": np.float32(dropped_peak)}


def save_score_map(path: Path, logits: np.ndarray, fmt: str, dtype: str, threshold: float,
                   max_classes: int) -> ScoreMap:
    """Write one image's map atomically in ``fmt``, its planes stored as ``dtype``; returns what
    ``load_score_map`` will read back (the rounded values), so a caller needs no re-read."""
    if fmt == "dense":
        stored = logits.astype(dtype)
        save_npy(path, stored)
        return ScoreMap(np.arange(len(stored)), stored.astype(np.float32), None, len(stored))
    record = compact(logits, threshold, max_classes, dtype)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **record)
    atomic_write(path, write)
    return ScoreMap(record["classes"].astype(np.int64), record["logits"].astype(np.float32),
                    record["rest"].astype(np.float32), int(record["num_classes"]), float(record["dropped_peak"]))


def _require_finite(path: Path, item_id: str, bad: int) -> None:
    # NaN wins every arg-max and softmax comparison it is in, so it would be scored as a class.
    if bad:
        raise ScoreMapError(f"score map for id '{item_id}' holds NaN/Inf at {bad} values: {path}")


def load_score_map(path: Path, item_id: str, num_classes: int) -> ScoreMap:
    """Either format, checked against the data set's class count and for NaN/Inf."""
    try:
        data = np.load(path)
    except FileNotFoundError:
        raise ScoreMapError(f"score map missing for id '{item_id}': {path}") from None
    except (OSError, ValueError) as e:
        raise ScoreMapError(f"score map for id '{item_id}' is unreadable: {path} ({e})") from None
    if isinstance(data, np.ndarray):
        if data.ndim != 3:
            raise ScoreMapError(f"score map for id '{item_id}' must be classes x height x width, "
                                f"got shape {data.shape}: {path}")
        if data.shape[0] != num_classes:
            raise ScoreMapError(f"score map for id '{item_id}' has {data.shape[0]} classes, the data set has "
                                f"{num_classes} (data.num_classes): {path}")
        _require_finite(path, item_id, np.count_nonzero(~np.isfinite(data)))
        return ScoreMap(np.arange(num_classes), data.astype(np.float32), None, num_classes)
    with data:
        try:
            classes, logits, rest, stored, peak = (data[k] for k in ("classes", "logits", "rest", "num_classes",
                                                                       "dropped_peak"))
        except KeyError as e:
            raise ScoreMapError(f"score map for id '{item_id}' lacks {e}: {path}") from None
    if int(stored) != num_classes:
        raise ScoreMapError(f"score map for id '{item_id}' was made for {int(stored)} classes, the data set has "
                            f"{num_classes} (data.num_classes): {path}")
    if logits.ndim != 3 or logits.shape[0] != len(classes) or rest.shape != logits.shape[1:]:
        raise ScoreMapError(f"score map for id '{item_id}' is inconsistent (classes {classes.shape}, logits "
                            f"{logits.shape}, rest {rest.shape}): {path}")
    # ``rest`` is -inf where the dropped classes have no probability (everywhere when none was
    # dropped); +inf or NaN there, or any non-finite kept logit, would decide pixels silently.
    _require_finite(path, item_id, np.count_nonzero(~np.isfinite(logits))
                    + np.count_nonzero(np.isnan(rest) | np.isposinf(rest)))
    return ScoreMap(classes.astype(np.int64), logits.astype(np.float32), rest.astype(np.float32), num_classes,
                    float(peak))


def to_dense(score: ScoreMap, floor: float) -> np.ndarray:
    """(C, h, w) float32 logits; a compact map's dropped classes get ``floor``, below any kept logit,
    so the arg-max over all C equals the arg-max over the kept classes."""
    if score.rest is None:
        return score.logits
    dense = np.full((score.num_classes,) + score.logits.shape[1:], floor, np.float32)
    dense[score.classes] = score.logits
    return dense


def bytes_bound(num_images: int, num_classes: int, height: int, width: int, fmt: str, dtype: str,
                max_classes: int) -> int:
    """The most disk the maps of ``num_images`` can take (headers aside)."""
    planes = num_classes if fmt == "dense" else min(max_classes, num_classes) + 1
    return num_images * planes * height * width * np.dtype(dtype).itemsize

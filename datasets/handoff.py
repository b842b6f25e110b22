"""What the first stage hands to the second: the folder names, the confidence-mask rule and
the mask's label precision, each in one place.

The first stage's ``export`` step writes ``<export_to>/irn_pseudo_label/<stem>.png`` and
``<export_to>/irn_mask/<stem>.png`` (the reference's names, which the second stage's
``data.pseudo_label_dir`` / ``data.mask_dir`` default to); the synthetic generators write the
same layout. A mask file is an 8-bit RGB PNG, three equal channels, 255 = confident (first-stage
spec §14, what the reference's torchvision ``save_image`` wrote).

The confidence-mask rule (first-stage spec §14): in every class region of the label map
(background included, classes ascending) the ``floor(n_c / (1/thd))`` pixels with the largest
score are confident; equal scores keep row-major order (QUIRK-14 fixed: a stable sort). The
first stage ranks by the margin top-1 − top-2 of its score stack (``margins``, QUIRK-13 tie
variants); the synthetic generators rank by a simulated score. An image without any class
(COCO) gets a random ``keep_count`` of its pixels (QUIRK-15 fixed) or none.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from utils.io import save_png

if TYPE_CHECKING:  # tensor methods only: the light tools that read the folder names never load torch
    import torch

# The hand-off folders under the export folder (first stage) and the data root (second stage).
PSEUDO_LABEL_DIR = "irn_pseudo_label"
MASK_DIR = "irn_mask"

TIE_MODES = ("original", "zero")
NO_CLASS_MASKS = ("random_half", "zero")  # QUIRK-15 fixed: full-size masks, seeded or empty


def margins(score: torch.Tensor, tie_mode: str) -> torch.Tensor:
    """top-1 − top-2 per pixel of a (K+1, H, W) score stack, in the score's dtype.

    ``original`` (QUIRK-13): every entry equal to the top-1 value is zeroed before top-2, so
    with a tie the margin is top-1 minus the next distinct value (top-1 itself if none is left).
    ``zero``: the second-largest entry, ties included (margin 0); a single channel counts its
    value against 0.
    """
    if tie_mode not in TIE_MODES:
        raise ValueError(f"margin_tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")
    top1 = score.max(dim=0).values
    if tie_mode == "original":
        rest = score.masked_fill(score == top1.unsqueeze(0), 0)
        return top1 - rest.max(dim=0).values
    if score.shape[0] < 2:
        return top1
    top2 = score.topk(2, dim=0).values[1]
    return top1 - top2


def keep_count(n: int, thd: float) -> int:
    """``floor(n / (1/thd))``, the reference's arithmetic (n // 2 for thd 0.5)."""
    return int(n / (1.0 / thd))


def keep_most_confident(score: np.ndarray, label: np.ndarray, thd: float) -> np.ndarray:
    """The rule itself: (H, W) uint8, 1 = confident, the ``keep_count`` highest ``score`` pixels
    of every class region of ``label``; equal scores keep row-major order."""
    flat_score = np.asarray(score).reshape(-1)
    flat = np.asarray(label).reshape(-1)
    mask = np.zeros(flat.shape, dtype=np.uint8)
    for c in np.unique(flat):  # ascending class ids
        idx = np.flatnonzero(flat == c)  # row-major order
        k = keep_count(idx.size, thd)
        if k == 0:
            continue
        # Stable descending sort: equal scores keep row-major order (QUIRK-14 fixed).
        order = np.argsort(-flat_score[idx], kind="stable")
        mask[idx[order[:k]]] = 1
    return mask.reshape(np.asarray(label).shape)


def confidence_mask(score: torch.Tensor, pred: np.ndarray, thd: float, tie_mode: str) -> np.ndarray:
    """The first stage's mask: (H, W) uint8, 1 = confident, ranked by ``margins`` within each
    class region of ``pred``."""
    if not 0.0 < thd <= 1.0:
        raise ValueError(f"mask_thd must be in (0, 1], got {thd}")
    return keep_most_confident(margins(score, tie_mode).numpy(), pred, thd)


def random_keep(rng: np.random.Generator, shape: tuple[int, int], thd: float) -> np.ndarray:
    """(H, W) uint8: ``keep_count(H·W, thd)`` pixels set to 1, the first of a permutation drawn from ``rng``."""
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros(h * w, dtype=np.uint8)
    mask[rng.permutation(h * w)[: keep_count(h * w, thd)]] = 1
    return mask.reshape(h, w)


def no_class_mask(shape: tuple[int, int], item_id: str, seed: int, mode: str, thd: float) -> np.ndarray:
    """(H, W) uint8 mask of an image without classes (QUIRK-15 fixed).

    ``random_half``: exactly ``keep_count(H·W, thd)`` (floor(N/2) at 0.5) pixels, a permutation
    drawn from numpy's PCG64 seeded by (``seed``, crc32 of the id), so the same seed and id
    always give the same mask and every image its own; ``zero``: nothing marked.
    """
    if mode not in NO_CLASS_MASKS:
        raise ValueError(f"no_class_mask must be one of {NO_CLASS_MASKS}, got {mode!r}")
    if mode == "zero":
        return np.zeros((int(shape[0]), int(shape[1])), dtype=np.uint8)
    rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(item_id.encode("utf-8"))])
    return random_keep(rng, shape, thd)


def save_mask(path: str | Path, mask: np.ndarray) -> Path:
    """The hand-off file: RGB PNG, three equal channels, 0 / 255 (non-zero in ``mask`` = confident)."""
    v = (np.asarray(mask) > 0).astype(np.uint8) * 255
    return save_png(path, np.repeat(v[..., None], 3, axis=2))


# ----------------------------------------------------------------------------- precision

PRECISION_COUNTS = ("kept_valid", "kept_correct", "unkept_valid", "unkept_correct")


def precision_counts(label: np.ndarray, mask: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, int]:
    """Pixel counts behind the mask's label precision, over the ``valid`` pixels: kept (mask
    non-zero) and unkept pixels, and those among them where ``label`` equals ``gt``."""
    kept = np.asarray(mask) > 0
    correct = valid & (label == gt)
    return {"kept_valid": int((kept & valid).sum()), "kept_correct": int((kept & correct).sum()),
            "unkept_valid": int((~kept & valid).sum()), "unkept_correct": int((~kept & correct).sum())}


def mask_precision(counts: Mapping[str, int], empty: float | None = None) -> dict[str, float | None]:
    """Label precision on kept and on unkept pixels from (summed) ``precision_counts``;
    ``empty`` where a side has no valid pixel."""
    def ratio(a: int, b: int) -> float | None:
        return a / b if b else empty

    return {"kept_precision": ratio(counts["kept_correct"], counts["kept_valid"]),
            "unkept_precision": ratio(counts["unkept_correct"], counts["unkept_valid"])}


__all__ = ["PSEUDO_LABEL_DIR", "MASK_DIR", "TIE_MODES", "NO_CLASS_MASKS", "margins", "keep_count",
           "keep_most_confident", "confidence_mask", "random_keep", "no_class_mask", "save_mask",
           "PRECISION_COUNTS", "precision_counts", "mask_precision"]

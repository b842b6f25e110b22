"""Saved score map -> label map at full resolution, with an optional dense CRF (spec second-stage §7);
the first stage's seed CRF on hard labels (spec §9) shares the CRF itself (``mean_field``).

Only numpy, OpenCV and pydensecrf: test.py's worker processes import this module, so it
stays free of torch (a torch import per worker costs seconds and hundreds of MB).

The CRF is Krähenbühl & Koltun's fully connected CRF through ``pydensecrf``: unary
= -log(probability), a Gaussian (smoothness) and a bilateral (appearance) Potts term.
``crf_predict`` can run it over a subset of the labels ("label pruning"): with a Potts
model a label's pairwise message depends only on that label's own marginals, so
labels that are negligible everywhere in the image only enter through the per-pixel
normalisation; dropping them changes the kept labels' marginals by about their (tiny)
mass, and the cost of the mean-field iterations falls with the label count.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from utils.score_maps import ScoreMap


def interpolation_matrix(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
    """(size_out, size_in) float32 weights of 1-D linear interpolation, PyTorch's sampling rule."""
    dst = np.arange(size_out, dtype=np.float64)
    if align_corners:
        src = dst * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros_like(dst)
    else:
        # Half-pixel centres; PyTorch clamps negative source coordinates to 0 (no mirroring).
        src = np.maximum((dst + 0.5) * (size_in / size_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = src - i0
    m = np.zeros((size_out, size_in), np.float64)
    rows = np.arange(size_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m.astype(np.float32)


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resize of a (C, h, w) map to (C, H, W), float32, as ``F.interpolate`` (no antialias).

    Written as two small matrix products so that any class count works (OpenCV's
    resize caps the channel count) and both corner conventions of the model config hold.
    """
    maps = np.asarray(maps, dtype=np.float32)
    ry = interpolation_matrix(maps.shape[1], size[0], align_corners)
    rx = interpolation_matrix(maps.shape[2], size[1], align_corners)
    return np.ascontiguousarray(np.matmul(ry, maps @ rx.T))


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def crf_image(image: np.ndarray, legacy: bool, legacy_mean: Sequence[float]) -> np.ndarray:
    """The image the CRF's colour term sees: HxWx3 uint8, C-contiguous.

    ``legacy`` reproduces the reference (QUIRK, spec §7): mean RGB subtracted, then cast to
    uint8, so negative values wrap around. The wrap is written out (truncate, then modulo
    256) because numpy's float -> uint8 cast of negatives is platform-defined; on x86 it
    gives the same bytes.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be HxWx3, got shape {image.shape}")
    if not legacy:
        return np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # pydensecrf refuses read-only buffers
    shifted = image.astype(np.float64) - np.asarray(legacy_mean, dtype=np.float64)
    return np.ascontiguousarray(np.trunc(shifted).astype(np.int64) & 255, dtype=np.uint8)


@dataclass
class CrfKernels:
    """What every dense CRF of both stages sets: the mean-field iterations and the two Potts
    kernels, a Gaussian (smoothness) and a bilateral (appearance) one. The second stage's
    ``test.crf`` (utils/config.CrfCfg) and the first stage's ``HardLabelCrf`` extend it."""
    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float


def mean_field(unary: np.ndarray, image: np.ndarray, crf: CrfKernels) -> np.ndarray:
    """Mean-field marginals (C, H, W) float32 of the dense CRF with energies ``unary`` (C, H*W)
    over ``image`` (HxWx3 uint8) and ``crf``'s kernels."""
    import pydensecrf.densecrf as dcrf  # only the CRF's callers need pydensecrf installed

    c = unary.shape[0]
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=crf.gaussian_sxy, compat=crf.gaussian_compat)
    d.addPairwiseBilateral(sxy=crf.bilateral_sxy, srgb=crf.bilateral_srgb,
                           rgbim=np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]),
                           compat=crf.bilateral_compat)
    return np.asarray(d.inference(crf.iterations), dtype=np.float32).reshape(c, h, w)


def dense_crf(prob: np.ndarray, image: np.ndarray, crf: Any) -> np.ndarray:
    """Mean-field marginals (C, H, W) float32 of the dense CRF over ``prob`` (C, H, W).

    ``crf`` carries the config's ``test.crf`` fields; ``image`` is HxWx3 uint8 (see ``crf_image``).
    """
    c, h, w = prob.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"CRF image is {image.shape[1]}x{image.shape[0]} but the map is {w}x{h} (width x height)")
    # The floor keeps -log finite; it is pydensecrf's unary_from_softmax default, the reference's call.
    return mean_field(-np.log(np.clip(prob, crf.prob_clip, 1.0)).reshape(c, -1), image, crf)


@dataclass
class HardLabelCrf(CrfKernels):
    """The first stage's seed CRF (spec §9; its crf_* settings): the kernels, and each pixel's
    hard label at probability ``gt_prob``, the other labels sharing the rest."""
    gt_prob: float


def hard_label_unary(labels: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    """(n_labels, N) float32 energies: −ln gt_prob for the given label, −ln((1−gt_prob)/(n−1)) for
    the others ("zero is a normal label", pydensecrf's ``unary_from_labels(zero_unsure=False)``)."""
    if n_labels < 2:
        raise ValueError("a CRF needs at least two labels")
    flat = labels.reshape(-1).astype(np.int64)
    u = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    u[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return u


def hard_label_crf(image: np.ndarray, labels: np.ndarray, n_labels: int, crf: HardLabelCrf) -> np.ndarray:
    """(H, W) int64 argmax of the CRF's marginals over the hard ``labels`` (H, W) of ``image``."""
    return np.argmax(mean_field(hard_label_unary(labels, n_labels, crf.gt_prob), image, crf), axis=0)


def kept_labels(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Sorted labels whose probability reaches ``threshold`` somewhere, plus every label
    that wins a pixel (so a threshold above 1/C can never drop the prediction itself)."""
    peak = prob.reshape(prob.shape[0], -1).max(axis=1)
    keep = set(np.flatnonzero(peak >= threshold).tolist())
    keep.update(np.unique(prob.argmax(axis=0)).tolist())
    return np.array(sorted(keep), dtype=np.int64)


def crf_predict(prob: np.ndarray, image: np.ndarray, crf: Any, prune: bool | None = None) -> np.ndarray:
    """Label map (H, W) int64 after the dense CRF; ``prune`` (default: the config's
    ``prune_labels``) runs it over ``kept_labels`` only."""
    prune = crf.prune_labels if prune is None else prune
    if not prune:
        return dense_crf(prob, image, crf).argmax(axis=0)
    keep = kept_labels(prob, crf.prune_threshold)
    if keep.size == 1:  # one label left: the CRF cannot change anything
        return np.full(prob.shape[1:], keep[0], dtype=np.int64)
    # No renormalisation: the kept labels' unaries stay exactly those of the full CRF.
    # ``keep`` is sorted, so ties still resolve to the lowest label id, as argmax over all labels.
    return keep[dense_crf(prob[keep], image, crf).argmax(axis=0)]


def postprocess(logits: "np.ndarray | ScoreMap", image: np.ndarray, crf: Any | None, align_corners: bool,
                prune: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Saved map + original RGB image -> (prediction, CRF prediction or None), uint8 (H, W).

    Upsample to the image size, softmax over classes, argmax; with ``crf`` also the
    dense CRF on the true (or, with ``crf.legacy_image``, the reference's) image. ``logits``
    is a dense (C, h, w) array or a ``ScoreMap`` (utils/score_maps.py): a compact map's
    ``rest`` plane takes part in the softmax, so its kept labels get their probabilities
    among all C, and only kept labels can be predicted.
    """
    if not isinstance(logits, ScoreMap):
        logits = ScoreMap(np.arange(len(logits)), np.asarray(logits, np.float32), None, len(logits))
    h, w = image.shape[:2]
    planes = logits.logits
    if logits.rest is not None and np.isfinite(logits.rest).any():
        # -inf (nothing dropped at a pixel) would turn into NaN in the interpolation's products.
        planes = np.concatenate([planes, np.maximum(logits.rest, REST_FLOOR)[None]])
    prob = softmax(upsample_bilinear(planes, (h, w), align_corners), axis=0)[:len(logits.classes)]
    pred = logits.classes[prob.argmax(axis=0)].astype(np.uint8)
    if crf is None:
        return pred, None
    rgb = crf_image(image, crf.legacy_image, crf.legacy_mean)
    return pred, logits.classes[crf_predict(prob, rgb, crf, prune)].astype(np.uint8)


REST_FLOOR = -1.0e4  # a compact map's "nothing dropped here": exp() of it is 0 in float32


# ----------------------------------------------------------------------------- parallel map

def available_cores() -> int:
    """Cores this process may run on (taskset / cgroup affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def limit_threads() -> Callable[[], None]:
    """One compute thread in this process: n workers then use n cores, not n x cores.

    The environment variables only reach libraries loaded after this call (and child
    processes); OpenCV and torch, when loaded, are told directly. Returns a function that
    restores the previous settings (for the in-process case, ``n_jobs`` 1).
    """
    env = {var: os.environ.get(var) for var in _THREAD_VARS}
    os.environ.update({var: "1" for var in _THREAD_VARS})
    cv2 = sys.modules.get("cv2")
    torch = sys.modules.get("torch")
    cv2_threads = cv2.getNumThreads() if cv2 is not None else None
    torch_threads = torch.get_num_threads() if torch is not None else None
    # Only when needed: in a forked child, cv2.setNumThreads waits forever for the worker
    # threads of the parent's pool, which the fork did not copy.
    if cv2 is not None and cv2_threads != 1:
        cv2.setNumThreads(1)
    if torch is not None and torch_threads != 1:
        torch.set_num_threads(1)

    def restore() -> None:
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if cv2_threads is not None:
            cv2.setNumThreads(cv2_threads)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    return restore


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_init(init: Callable[..., None] | None, args: tuple) -> None:
    # A forked worker inherits the parent's SIGTERM disposition: ignored (a loader worker, a
    # failing rank) or a Python handler (training's stop flag), it survived the SIGTERM of
    # pool.terminate() and the join after it waited forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    limit_threads()
    if init is not None:
        init(*args)


def parallel_map(func: Callable[[Any], Any], tasks: Sequence[Any], n_jobs: int, chunk_size: int,
                 init: Callable[..., None] | None = None, init_args: tuple = ()) -> Iterator[Any]:
    """``func`` over ``tasks`` in ``n_jobs`` single-threaded processes, handed out ``chunk_size``
    at a time (fewer when there are too few tasks to keep every worker busy), results yielded
    as they finish (any order). ``n_jobs`` 1 runs in this process.

    ``init(*init_args)`` runs once per worker: large shared settings travel once, not per task.
    Linux forks (workers start instantly, nothing re-imported); elsewhere workers are spawned.
    """
    if n_jobs <= 1:
        restore = limit_threads()
        try:
            if init is not None:
                init(*init_args)
            yield from map(func, tasks)
        finally:
            restore()
        return
    method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform == "linux" else "spawn"
    ctx = mp.get_context(method)
    # Forked workers start single-threaded: the limits are set here, before the fork, so no
    # child has to shut down a thread pool it inherited without its threads (OpenCV's hangs).
    restore = limit_threads()
    try:
        pool = ctx.Pool(n_jobs, initializer=_worker_init, initargs=(init, init_args))
    finally:
        restore()
    try:
        chunk = max(1, min(chunk_size, math.ceil(len(tasks) / n_jobs)))
        yield from pool.imap_unordered(func, tasks, chunksize=chunk)
        pool.close()
    finally:
        pool.terminate()  # also on an error or an abandoned generator: no orphan workers
        pool.join()

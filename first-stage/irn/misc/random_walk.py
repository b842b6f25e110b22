"""Random walk of CAMs over the IRN boundary-derived affinities (spec §12.2–§12.3).

Two paths compute the same ``rw = v · T^(2^exp_times)``:

* ``dense`` — the reference: the full n×n transition matrix (n = h·w stride-4 pixels) squared
  ``exp_times`` times. ~2·exp_times·n³ flops and n² floats per matrix (~1 GB at VOC size).
* ``sparse`` — T has at most 69 non-zeros per column (r = 5), so ``v · T^256`` is 256 products
  of a sparse matrix with the K score rows: ~n·69·K·256 flops. Same mathematics, summation
  order differs (differences are fp32 rounding only).

QUIRK-2: the reference's dense matmuls ran in TF32 on Ampere GPUs; ``allow_tf32`` reproduces
that on CUDA (default off = exact fp32). QUIRK-24: the reference normalises by the global max
without epsilon (NaN when everything is 0); here an all-zero walk stays all zeros.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from datasets.affinity import PathIndex, edge_to_affinity

RW_MODES = ("sparse", "dense")

_PATH_INDEX_CACHE: dict[int, PathIndex] = {}


def _path_index(radius: int) -> PathIndex:
    if radius not in _PATH_INDEX_CACHE:
        _PATH_INDEX_CACHE[radius] = PathIndex(radius)
    return _PATH_INDEX_CACHE[radius]


def _as_edge_map(edge: torch.Tensor) -> torch.Tensor:
    if edge.dim() == 3:
        if edge.shape[0] != 1:
            raise ValueError(f"boundary map must be (1, h, w) or (h, w), got {tuple(edge.shape)}")
        edge = edge[0]
    if edge.dim() != 2:
        raise ValueError(f"boundary map must be (1, h, w) or (h, w), got {tuple(edge.shape)}")
    return edge if edge.is_floating_point() else edge.float()


def _padded_path_affinity(edge: torch.Tensor, radius: int):
    """Pad the boundary map as the reference does (1 on the left, right and bottom, ``radius``
    wide) and compute every path's affinity on it. Returns (edge, padded, path index, affinity)."""
    e = _as_edge_map(edge)
    r = int(radius)
    padded = F.pad(e[None, None], (r, r, 0, r), value=1.0)[0, 0]
    idx = _path_index(r).indices(tuple(padded.shape), e.device, cache=False)
    return e, padded, idx, edge_to_affinity(padded.reshape(1, -1), idx)[0]


def affinity_pairs(edge: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-pixel pairs ``(i, j, A_ij)`` of the half-disc, i.e. each unordered pair once.

    As the reference: pad the boundary map with 1 (``radius`` columns left and right,
    ``radius`` rows at the bottom, none on top) so the source window of the path index covers
    every image pixel, take ``1 - max(boundary on the path)``, then drop pairs with a pad end.
    i, j are row-major indices into the unpadded (h, w) map.
    """
    e, padded, idx, aff = _padded_path_affinity(edge, radius)  # aff: (n_dirs, N_src)
    h, w = e.shape
    r = int(radius)
    hp, wp = padded.shape
    # Padded linear index -> image index (-1 for pad pixels).
    lookup = torch.full((hp * wp,), -1, dtype=torch.long, device=e.device)
    ys, xs = torch.meshgrid(torch.arange(h, device=e.device), torch.arange(r, r + w, device=e.device), indexing="ij")
    lookup[(ys * wp + xs).reshape(-1)] = torch.arange(h * w, device=e.device)
    src = lookup[idx.src].unsqueeze(0).expand_as(aff)
    dst = lookup[idx.dst]
    keep = (src >= 0) & (dst >= 0)
    return src[keep], dst[keep], aff[keep]


def dense_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """The reference's dense affinity matrix A (n×n) of the image pixels (spec §12.2).

    Built on the padded map exactly as the reference: scatter the path affinities into an
    Np×Np matrix in both orientations, set the diagonal to 1, then keep the image pixels.
    Symmetric, entries in [0, 1], non-zero only for offsets with dy² + dx² < r².
    """
    e, padded, idx, aff = _padded_path_affinity(edge, radius)
    h, w = e.shape
    r = int(radius)
    hp, wp = padded.shape
    n_pad = hp * wp
    dense = torch.zeros((n_pad, n_pad), dtype=e.dtype, device=e.device)
    src = idx.src.unsqueeze(0).expand_as(aff)
    dst = idx.dst
    dense[src, dst] = aff
    dense[dst, src] = aff
    dense.diagonal().fill_(1.0)
    ys, xs = torch.meshgrid(torch.arange(h, device=e.device), torch.arange(r, r + w, device=e.device), indexing="ij")
    keep = (ys * wp + xs).reshape(-1)
    return dense.index_select(0, keep).index_select(1, keep)


def dense_transition(edge: torch.Tensor, beta: float, exp_times: int, radius: int) -> torch.Tensor:
    """The reference's ``T^(2^exp_times)`` (n×n, column-stochastic), as spec §12.2.

    ``A^β`` element-wise, columns normalised to sum 1, then squared ``exp_times`` times.
    """
    t = dense_affinity(edge, radius).pow(beta)
    t = t / t.sum(dim=0, keepdim=True)
    for _ in range(int(exp_times)):
        t = t @ t
    return t


def sparse_transition(edge: torch.Tensor, beta: float, radius: int,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Tᵀ`` as a sparse CSR (n×n) matrix: row j holds ``T[i, j] = A_ij^β / Σ_i A_ij^β``.

    Stored transposed so that one walk step ``rw ← rw · T`` is ``rwᵀ ← Tᵀ · rwᵀ`` (sparse × dense).
    ``dtype`` (default: the boundary map's) is used from the affinities on.
    """
    e = _as_edge_map(edge)
    if dtype is not None:
        e = e.to(dtype)
    n = e.numel()
    i, j, a = affinity_pairs(e, radius)
    diag = torch.arange(n, device=e.device)
    rows = torch.cat([i, j, diag])  # i -> row of A, both orientations of each pair plus A_ii = 1
    cols = torch.cat([j, i, diag])
    vals = torch.cat([a, a, torch.ones(n, dtype=a.dtype, device=e.device)]).pow(beta)
    deg = torch.zeros(n, dtype=vals.dtype, device=e.device).index_add_(0, cols, vals)
    vals = vals / deg[cols]
    # Transposed: row = column j of T.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        coo = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n, n)).coalesce()
        return coo.to_sparse_csr()


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily limit torch's CPU threads (None = leave as is).

    One sparse step at VOC size is ~1 ms of work: with several threads every one of the 256
    steps ends in a barrier, and a core busy with anything else stalls it for a whole
    scheduler time slice (measured 60x slower on 2 shared cores); one thread is steady.
    """
    old = torch.get_num_threads()
    if n is not None and n > 0 and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    """Temporarily set CUDA's fp32 matmul precision (QUIRK-2); CPU matmuls are unaffected."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def random_walk(cam: torch.Tensor, edge: torch.Tensor, beta: float, exp_times: int,
                radius: int, mode: str, allow_tf32: bool = False,
                sparse_dtype: torch.dtype = torch.float64, cpu_threads: int | None = 1) -> torch.Tensor:
    """Propagate CAMs with the boundary-aware transition matrix: ``rw = (cam·(1−e)) · T^(2^exp_times)``.

    cam: (K, h, w) stride-4 CAMs; edge: (1, h, w) or (h, w) boundary probabilities.
    Returns (K, h, w) float32 on cam's device. ``mode`` picks the dense reference (fp32, as
    the reference; ``allow_tf32`` = QUIRK-2 on CUDA) or the sparse path. The sparse path runs
    in ``sparse_dtype``: float64 costs nothing measurable there and makes its result the
    exact value, so dense-vs-sparse differences are the dense path's own fp32 rounding.
    ``cpu_threads`` limits torch's threads during the sparse CPU loop (None = unchanged).
    """
    if mode not in RW_MODES:
        raise ValueError(f"rw_mode must be one of {RW_MODES}, got {mode!r}")
    e = _as_edge_map(edge).to(cam.device)
    if cam.dim() != 3 or tuple(cam.shape[1:]) != tuple(e.shape):
        raise ValueError(f"cam {tuple(cam.shape)} and boundary {tuple(e.shape)} sizes differ")
    k, h, w = cam.shape
    v = (cam.float() * (1.0 - e)).reshape(k, h * w)  # boundary pixels start with less mass
    if k == 0:
        return v.reshape(k, h, w)
    if mode == "dense":
        with _tf32(allow_tf32):
            t = dense_transition(e, beta, exp_times, radius)
            rw = (v.to(t.dtype) @ t).float()
    else:
        threads = cpu_threads if cam.device.type == "cpu" else None
        with _cpu_threads(threads), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            tt = sparse_transition(e, beta, radius, dtype=sparse_dtype)
            x = v.t().to(sparse_dtype).contiguous()  # (n, K)
            for _ in range(2 ** int(exp_times)):
                x = tt @ x
        rw = x.t().float()
    return rw.reshape(k, h, w)


def rw_to_scores(rw: torch.Tensor, image_size: tuple[int, int], keys: torch.Tensor | np.ndarray,
                 bg_thres: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-walk maps → full-resolution score stack and labels (spec §12.3).

    rw: (K, h, w); keys: (K+1,) class ids ``[0, k_1+1, ...]``. Upsample ×4 (bilinear,
    align_corners False), keep the top-left H×W, divide by the global max (QUIRK-24 guard:
    a max of 0 leaves zeros), prepend the constant background plane ``bg_thres``; argmax (ties
    → lowest channel, so an exact ``bg_thres`` is background) mapped through ``keys``.
    Returns ``score`` (K+1, H, W) float32 and ``pred`` (H, W) int64.
    """
    H, W = int(image_size[0]), int(image_size[1])
    keys_t = torch.as_tensor(np.asarray(keys) if not isinstance(keys, torch.Tensor) else keys).long()
    k = rw.shape[0]
    if keys_t.numel() != k + 1:
        raise ValueError(f"keys has {keys_t.numel()} entries for {k} random-walk maps (+ background)")
    if k > 0:
        up = F.interpolate(rw.float()[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0, :H, :W]
        if up.shape[1:] != (H, W):
            raise ValueError(f"random-walk map {tuple(rw.shape[1:])} ×4 is smaller than the image {H}x{W}")
        top = up.max()
        if top > 0:
            up = up / top
    else:
        up = rw.new_zeros((0, H, W), dtype=torch.float32)
    score = torch.cat([torch.full((1, H, W), float(bg_thres), dtype=torch.float32, device=up.device), up])
    pred = keys_t.to(score.device)[score.argmax(dim=0)]
    return score, pred


__all__ = ["RW_MODES", "affinity_pairs", "dense_affinity", "dense_transition", "sparse_transition", "random_walk", "rw_to_scores"]

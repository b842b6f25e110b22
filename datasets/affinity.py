"""Inter-pixel relation machinery: search directions, paths and flattened indices (spec §10, §11.2).

IRN relates every pixel to its neighbours within a radius ``r``. Each unordered pair appears
once: the directions cover a strict half-disc. The affinity of a pair is ``1 - max`` of the
boundary map along the straight-line path between the two pixels, so a boundary anywhere on
the path (endpoints included) cuts the relation.

All affinity tensors use one channel order, ``search_dst``: directions grouped by path
length (shortest first), generation order inside a group. Everything here is pure index
arithmetic, shared by IRN training (r = 10 on the 128x128 crop map), the affinity labels of
the data side and the random walk (r = 5).

It lives in ``datasets/`` because the affinity labels (``datasets/views.py``'s affinity view)
and IRN's edge-to-affinity (the network and the random walk) must agree on this one channel
order, and the data side cannot import from ``first-stage/irn``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# The seed maps' "unknown" value (ir_label 255); ids below it are known unless a bound is given.
from utils.voc import IGNORE_INDEX as SEED_IGNORE


def search_directions(radius: int) -> list[tuple[int, int]]:
    """Directions ``(dy, dx)`` of the strict half-disc ``dy² + dx² < r²`` in generation order.

    First the row ``(0, 1) .. (0, r-1)``, then rows ``dy = 1 .. r-1`` with ``dx`` ascending
    from ``-(r-1)``. The opposite half is implied (pairs are unordered).
    """
    rf = _reach(radius)
    dirs = [(0, x) for x in range(1, rf + 1)]
    for y in range(1, rf + 1):
        for x in range(-rf, rf + 1):
            if x * x + y * y < radius * radius:
                dirs.append((y, x))
    return dirs


def path_points(direction: tuple[int, int]) -> np.ndarray:
    """Lattice points on the segment from the origin to ``direction``, shape (L, 2), int64.

    A point of the (inclusive) bounding box belongs to the path when its squared distance to
    the line through the origin along ``direction`` is below 1. Points are ordered by decreasing
    ``|y| + |x|`` (stable on the row-major box order), so the first point is the destination.
    """
    dy, dx = direction
    norm2 = dy * dy + dx * dx
    if norm2 == 0:
        raise ValueError("direction (0, 0) has no path")
    pts = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            cross = dy * x - dx * y
            if cross * cross < norm2:  # (dy·x − dx·y)² / |d|² < 1, in integers
                pts.append((y, x))
    # Python's sort is stable: equal |y|+|x| keep the row-major order.
    pts.sort(key=lambda p: -(abs(p[0]) + abs(p[1])))
    return np.asarray(pts, dtype=np.int64)


def _reach(radius: int) -> int:
    """``rf = ceil(r) - 1``: the largest coordinate offset of a direction."""
    if radius < 2:
        raise ValueError(f"path radius must be >= 2, got {radius}")
    return int(math.ceil(radius)) - 1


@dataclass(frozen=True)
class MapIndices:
    """Flattened indices of one map size (spec §10.2).

    ``src`` (N_src,) linear indices of the source window; ``dst`` (n_dirs, N_src) those of its
    shifted copies (one per direction, ``search_dst`` order); ``paths`` one array per length
    group, (n_paths, L, N_src), the window shifted by every point of every path.
    """

    size: tuple[int, int]
    window: tuple[int, int]
    src: torch.Tensor
    dst: torch.Tensor
    paths: tuple[torch.Tensor, ...]

    @property
    def n_src(self) -> int:
        return int(self.src.numel())


class PathIndex:
    """Directions, paths and their flattened indices for radius ``r``.

    ``search_dst`` (n_dirs, 2) is the channel order of every affinity tensor; ``groups`` holds
    per path length the (n_paths, L, 2) path points. ``indices(size)`` gives the flattened
    indices for a map of that size (cached per size).
    """

    def __init__(self, radius: int):
        self.radius = int(radius)
        self.rf = _reach(self.radius)
        by_len: dict[int, list[np.ndarray]] = {}
        for d in search_directions(self.radius):
            p = path_points(d)
            by_len.setdefault(len(p), []).append(p)
        self.group_lengths: tuple[int, ...] = tuple(sorted(by_len))
        self.groups: tuple[np.ndarray, ...] = tuple(np.stack(by_len[n]) for n in self.group_lengths)
        # The first point of every path is its destination (see path_points).
        self.search_dst: np.ndarray = np.concatenate([g[:, 0, :] for g in self.groups])
        self._cache: dict[tuple[tuple[int, int], str], MapIndices] = {}

    @property
    def n_dirs(self) -> int:
        return int(self.search_dst.shape[0])

    def window(self, size: tuple[int, int]) -> tuple[int, int]:
        """Source window size ``(Hm - rf, Wm - 2 rf)``: every path from it stays inside the map."""
        hm, wm = int(size[0]), int(size[1])
        wh, ww = hm - self.rf, wm - 2 * self.rf
        if wh < 1 or ww < 1:
            raise ValueError(f"map {hm}x{wm} is too small for path radius {self.radius}: need at least "
                             f"{self.rf + 1} rows and {2 * self.rf + 1} columns")
        return wh, ww

    def indices(self, size: tuple[int, int], device: torch.device | str | None = None,
                cache: bool = True) -> MapIndices:
        """Indices for an (Hm, Wm) map on ``device``.

        Cached per size and device when ``cache`` (IRN training: one size, tens of millions of
        indices gathered every step). The random walk sees a new size for almost every image, so
        it passes ``cache=False`` and the indices live only as long as the call.
        """
        size = (int(size[0]), int(size[1]))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = (size, str(dev))
        if key in self._cache:
            return self._cache[key]
        base = self._cache.get((size, "cpu")) or self._build(size)
        out = base if dev.type == "cpu" else MapIndices(base.size, base.window, base.src.to(dev), base.dst.to(dev),
                                                        tuple(p.to(dev) for p in base.paths))
        if cache:
            self._cache[(size, "cpu")] = base
            self._cache[key] = out
        return out

    def _build(self, size: tuple[int, int]) -> MapIndices:
        hm, wm = size
        wh, ww = self.window(size)
        ys, xs = np.meshgrid(np.arange(wh), np.arange(self.rf, self.rf + ww), indexing="ij")
        src = (ys * wm + xs).reshape(-1)
        paths = []
        for g in self.groups:
            # Shifting the window by (py, px) adds py·Wm + px to every linear index.
            offsets = g[..., 0] * wm + g[..., 1]  # (n_paths, L)
            paths.append(torch.from_numpy(offsets[..., None] + src[None, None, :]))
        dst = torch.cat([p[:, 0, :] for p in paths])
        return MapIndices(size, (wh, ww), torch.from_numpy(src), dst, tuple(paths))


def edge_to_affinity(edge: torch.Tensor, indices: MapIndices) -> torch.Tensor:
    """``aff = 1 - max(edge over the path)`` for every direction and source pixel (spec §10.3).

    edge: (B, Hm·Wm) or (B, Hm, Wm) or (B, 1, Hm, Wm) boundary probabilities in [0, 1].
    Returns (B, n_dirs, N_src) in ``search_dst`` order. Differentiable in ``edge``.
    """
    flat = edge.reshape(edge.shape[0], -1)
    if flat.shape[1] != indices.size[0] * indices.size[1]:
        raise ValueError(f"edge map has {flat.shape[1]} pixels, indices are for a {indices.size} map")
    out = []
    for p in indices.paths:
        # Group by group keeps the gathered (B, n_paths, L, N_src) block small.
        g = flat[:, p.to(flat.device).reshape(-1)].reshape(flat.shape[0], *p.shape)
        out.append(1.0 - g.amax(dim=2))
    return torch.cat(out, dim=1)


def affinity_labels(label: torch.Tensor | np.ndarray, indices: MapIndices, num_valid: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels of a reduced label map (spec §11.2): ``(bg_pos, fg_pos, neg)``.

    label: (Hm, Wm) ids, 0 = background, 1..C classes; ids >= ``num_valid`` are unknown
    (pass the data set's label count: VOC 21, COCO 81); None: only the seed ignore value 255
    is unknown. Each output is float32 (n_dirs, N_src); they are pairwise disjoint and their
    union is the set of pairs with both ends known.
    """
    lab = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if tuple(lab.shape) != indices.size:
        raise ValueError(f"label map is {tuple(lab.shape)}, indices are for {indices.size}")
    flat = lab.reshape(-1).long()
    a = flat[indices.src].unsqueeze(0)  # (1, N_src), broadcast over directions
    b = flat[indices.dst]  # (n_dirs, N_src)
    bound = SEED_IGNORE if num_valid is None else int(num_valid)
    valid = (a < bound) & (b < bound)
    same = a == b
    bg_pos = valid & same & (a == 0)
    fg_pos = valid & same & (a > 0)
    neg = valid & ~same
    return bg_pos.float(), fg_pos.float(), neg.float()


__all__ = ["search_directions", "path_points", "PathIndex", "MapIndices", "edge_to_affinity", "affinity_labels"]

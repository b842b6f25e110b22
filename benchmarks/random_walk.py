"""Dense (reference) vs sparse random walk of the first stage (spec §12.2), on CPU.

    python benchmarks/random_walk.py                  # demo size 24x32 and VOC size 94x125
    python benchmarks/random_walk.py --sizes 24x32 64x64 --repeats 5

Per size it builds seeded, CAM-like test maps (K smooth class blobs normalised as make_cam
does; a boundary map that is high along object outlines), runs both paths through the same
score step as make_sem_seg (×4 upsample, global-max normalisation, background plane 0.25,
argmax), and reports the time of each path, the max abs difference of the normalised
scores and whether the argmax labels are identical. The dense path at VOC size takes minutes
and ~2.5 GB, so it runs once (``--dense_repeats``).

The last line reads ``speedup <x> max_abs_diff <d> labels_equal <true|false>``: x = dense /
sparse time at the largest size, d = the max over all sizes, labels_equal = all sizes.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from irn.misc.random_walk import random_walk, rw_to_scores

REPO = Path(__file__).resolve().parents[1]


def test_maps(h: int, w: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """CAM stack (K, h, w), boundary map (1, h, w) and keys (K+1,) for an h×w stride-4 map.

    Objects are discs; each class's CAM is a sum of Gaussian bumps peaking inside its discs
    (plus weak spill-over), max-normalised with +1e-5 like make_cam; the boundary map is a
    narrow ridge along the disc outlines with a little noise, as a trained IRN gives.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cams = np.zeros((classes, h, w))
    ridge = np.zeros((h, w))
    for k in range(classes):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            rad = rng.uniform(0.1, 0.25) * min(h, w)
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            cams[k] += np.exp(-(d / (0.8 * rad)) ** 2) + 0.1 * np.exp(-(d / (2.0 * rad)) ** 2)
            ridge = np.maximum(ridge, np.exp(-((d - rad) / 1.2) ** 2))
    cams /= cams.reshape(classes, -1).max(1)[:, None, None] + 1e-5
    edge = np.clip(0.95 * ridge + 0.05 * rng.random((h, w)), 0.0, 1.0)
    keys = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 21), classes, replace=False))])
    return (torch.from_numpy(cams).float(), torch.from_numpy(edge[None]).float(), keys.astype(np.int64))


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 94x125, got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_parse_size, nargs="+", default=[(24, 32), (94, 125)],
                   help="stride-4 map sizes HxW (VOC 375x500 -> 94x125)")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--beta", type=float, default=10)
    p.add_argument("--exp_times", type=int, default=8)
    p.add_argument("--radius", type=int, default=5)
    p.add_argument("--bg_thres", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the sparse path (median)")
    p.add_argument("--dense_repeats", type=int, default=1, help="timed runs of the dense path (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, beta {args.beta}, "
          f"exp_times {args.exp_times} ({2 ** args.exp_times} steps), radius {args.radius}", flush=True)

    worst_diff, all_equal, speedup = 0.0, True, math.nan
    for h, w in args.sizes:
        cam, edge, keys = test_maps(h, w, args.classes, args.seed)

        def run(mode: str) -> torch.Tensor:
            return random_walk(cam, edge, args.beta, args.exp_times, args.radius, mode=mode)

        # A warm-up of the sparse path keeps one-off allocator/kernel set-up out of the timing.
        run("sparse")
        t_sparse, rw_s = _time(lambda: run("sparse"), args.repeats)
        print(f"{h}x{w} (n = {h * w}): sparse {t_sparse * 1e3:.1f} ms; dense running...", flush=True)
        t_dense, rw_d = _time(lambda: run("dense"), args.dense_repeats)
        size = (4 * h, 4 * w)
        score_s, pred_s = rw_to_scores(rw_s, size, keys, args.bg_thres)
        score_d, pred_d = rw_to_scores(rw_d, size, keys, args.bg_thres)
        diff = float((score_s - score_d).abs().max())
        equal = bool(torch.equal(pred_s, pred_d))
        n_diff = int((pred_s != pred_d).sum())
        speedup = t_dense / t_sparse
        worst_diff, all_equal = max(worst_diff, diff), all_equal and equal
        print(f"{h}x{w}: dense {t_dense:.3f} s, sparse {t_sparse:.4f} s, speedup {speedup:.1f}x, "
              f"max |score diff| {diff:.2e}, labels equal {equal} ({n_diff} of {pred_s.numel()} px differ)",
              flush=True)
    print(f"speedup {speedup:.1f} max_abs_diff {worst_diff:.3e} labels_equal {str(all_equal).lower()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Statistics over training seeds: mean, sample standard deviation, and the paired difference of
two methods run with the same seeds (tools/demo.py --seeds, tools/noise_study.py).

Pairing matters: seeds share the data order and initialisation, so the per-seed difference
cancels much of the seed-to-seed swing that both methods' numbers share.
"""
from __future__ import annotations

import math
import statistics

# Two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal's 1.96
# would understate the width; the table stops where `--seeds` lists stop in practice).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(values: list[float]) -> dict:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "n": len(values), "values": list(values)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """``a - b`` over the seeds both have: mean, std, a 95 % t-interval of the mean difference
    (None below two seeds or beyond the table), and in how many seeds ``a`` is ahead."""
    seeds = [k for k in a if k in b]
    if not seeds:
        return None
    diffs = [a[k] - b[k] for k in seeds]
    out = {**summary(diffs), "seeds": seeds, "wins": sum(d > 0 for d in diffs)}
    n = len(diffs)
    if 2 <= n <= len(T95) + 1:
        half = T95[n - 2] * out["std"] / math.sqrt(n)
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    else:
        out["ci95"] = None
    return out

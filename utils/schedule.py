"""The poly learning-rate schedule, shared by both stages (spec §18 and the second stage's optim.*)."""
from __future__ import annotations


def poly_factor(it: int, max_it: int, power: float, floor: float = 0.0) -> float:
    """lr / base_lr of the poly schedule with a floor: max((1 - it/max_it)^power, floor)."""
    return max((1 - it / max_it) ** power, floor) if it < max_it else floor

"""The poly learning-rate schedule, shared by both stages (spec §18 and the second stage's optim.*).

The second stage drives it through ``torch.optim.lr_scheduler.LambdaLR`` (main.py); the first
stage's steps through ``PolyOptimizer``, the reference's SGD that applies it before each step.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


def poly_factor(it: int, max_it: int, power: float, floor: float = 0.0) -> float:
    """lr / base_lr of the poly schedule with a floor: max((1 - it/max_it)^power, floor)."""
    return max((1 - it / max_it) ** power, floor) if it < max_it else floor


def max_steps(num_items: int, batch_size: int, epochs: int) -> int:
    """The first stage's optimiser steps: ``floor(N / batch) * epochs`` (incomplete batches are
    dropped, spec §18)."""
    return (num_items // batch_size) * epochs


class PolyOptimizer(torch.optim.SGD):
    """SGD whose per-group lr is ``lr_g0 * poly_factor(k, max_step, power)`` (spec §18).

    Param groups may carry ``lr_mult`` (lr_g0 = lr * lr_mult), an explicit ``lr``, and
    their own ``weight_decay``; otherwise ``lr`` / ``weight_decay`` apply. ``k`` counts
    optimizer steps from 0: step 0 uses the full lr, step ``max_step - 1`` uses
    ``lr_g0 * (1/max_step) ** power``; from ``max_step`` on the lr is left where it was.

    QUIRK-20 (KEEP): the reference passes the weight decay in SGD's momentum slot, so its
    ``momentum`` is 1e-4 (the first stage's ``sgd_momentum``) and 0.9 is the poly *power*.
    Weight decay is coupled L2 (SGD's own), dampening 0, no Nesterov; parameters without
    gradients are skipped.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], lr: float,
                 weight_decay: float, max_step: int, momentum: float, power: float):
        groups: list[dict[str, Any]] = []
        for g in param_groups:
            if isinstance(g, torch.Tensor):
                g = {"params": [g]}
            g = dict(g)
            mult = float(g.pop("lr_mult", 1.0))
            g.setdefault("lr", lr * mult)
            g.setdefault("weight_decay", weight_decay)
            groups.append(g)
        if max_step < 1:
            raise ValueError(f"max_step must be >= 1, got {max_step} (dataset smaller than one batch?)")
        super().__init__(groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
        self.global_step = 0
        self.max_step = int(max_step)
        self.power = float(power)
        self.initial_lrs = [g["lr"] for g in self.param_groups]

    def step(self, closure=None):  # type: ignore[override]
        if self.global_step < self.max_step:
            factor = poly_factor(self.global_step, self.max_step, self.power)
            for g, lr0 in zip(self.param_groups, self.initial_lrs):
                g["lr"] = lr0 * factor
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["poly"] = {"global_step": self.global_step, "max_step": self.max_step, "power": self.power,
                         "initial_lrs": list(self.initial_lrs)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        poly = state_dict.pop("poly", None)
        super().load_state_dict(state_dict)
        if poly is not None:
            self.global_step = int(poly["global_step"])
            self.max_step = int(poly["max_step"])
            self.power = float(poly["power"])
            self.initial_lrs = list(poly["initial_lrs"])


__all__ = ["poly_factor", "max_steps", "PolyOptimizer"]

"""Poly-schedule SGD and seeding (spec §18, QUIRK-3, QUIRK-20)."""
from __future__ import annotations

import math
import os
import random
from typing import Any, Iterable

import numpy as np
import torch


class PolyOptimizer(torch.optim.SGD):
    """SGD whose per-group lr follows ``lr_g0 * (1 - k/max_step) ** power`` (spec §18).

    Param groups may carry ``lr_mult`` (lr_g0 = lr * lr_mult), an explicit ``lr``, and
    their own ``weight_decay``; otherwise ``lr`` / ``weight_decay`` apply. ``k`` counts
    optimizer steps from 0: step 0 uses the full lr, step ``max_step - 1`` uses
    ``lr_g0 * (1/max_step) ** power``; from ``max_step`` on the lr is left where it was.

    QUIRK-20 (KEEP): the reference passes the weight decay in SGD's momentum slot, so
    ``momentum`` defaults to 1e-4 and 0.9 is the poly *power*. Weight decay is coupled L2
    (SGD's own), dampening 0, no Nesterov; parameters without gradients are skipped.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], lr: float,
                 weight_decay: float, max_step: int, momentum: float = 1e-4, power: float = 0.9):
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

    def lr_factor(self, step: int) -> float:
        return (1.0 - step / self.max_step) ** self.power

    def step(self, closure=None):  # type: ignore[override]
        if self.global_step < self.max_step:
            factor = self.lr_factor(self.global_step)
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


def max_steps(num_items: int, batch_size: int, epochs: int) -> int:
    """``floor(N / batch) * epochs`` — incomplete batches are dropped (spec §18)."""
    return (num_items // batch_size) * epochs


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices); QUIRK-3 fix."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive Python/numpy seeds from torch's per-worker seed.

    torch seeds each worker with ``base_seed + worker_id`` where ``base_seed`` comes from the
    loader's generator, so a seeded generator (``loader_generator``) makes workers reproducible.
    """
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def loader_generator(seed: int) -> torch.Generator:
    """A torch Generator for DataLoader shuffling and worker base seeds."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def loader_kwargs(seed: int, num_workers: int) -> dict[str, Any]:
    """The seeding-related DataLoader keyword arguments in one place."""
    kw: dict[str, Any] = {"num_workers": num_workers, "generator": loader_generator(seed),
                          "worker_init_fn": seed_worker}
    if num_workers > 0:
        kw["persistent_workers"] = False
    return kw


def poly_lr(lr0: float, step: int, max_step: int, power: float = 0.9) -> float:
    """The learning rate the optimiser uses at 0-based step ``step`` (for tests/logs)."""
    if step >= max_step:
        step = max_step - 1
    return lr0 * math.pow(1.0 - step / max_step, power)


__all__ = ["PolyOptimizer", "max_steps", "seed_everything", "seed_worker", "loader_generator",
           "loader_kwargs", "poly_lr"]

"""The CE baseline on reliable pixels only (``method.name: baseline_kept``): one net, cross
entropy averaged over the pixels whose mask is 1 and whose label is a class. The mask study
(tools/mask_study.py) compares it with BECO: the ablation that trusts the mask and drops the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from engine.beco import METHODS, training_step
from engine.config import load_config
from losses.beco_loss import kept_ce_loss
from tests.conftest import REPO

V = 255
TARGET = [[0, 1], [V, 2]]
MASK = [[1, 0], [0, 1]]
LOGITS = [[(2.0, 0.0, -1.0), (0.0, 1.0, 0.0)], [(0.5, 0.5, 0.5), (1.0, -1.0, 3.0)]]


def _ce(logits: tuple[float, ...], c: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[c]


def test_kept_ce_is_the_mean_over_reliable_labelled_pixels():
    logits = torch.tensor(LOGITS).permute(2, 0, 1)[None]
    got = kept_ce_loss(logits, torch.tensor([TARGET]), torch.tensor([MASK]))
    hand = (_ce(LOGITS[0][0], 0) + _ce(LOGITS[1][1], 2)) / 2  # the two mask-1 pixels; the rest count nothing
    assert math.isclose(float(got["total"]), hand, rel_tol=1e-6) and float(got["ce1"]) == float(got["total"])
    # 255 under mask 1 (refused by the preflight) would still count nothing, and no pixel kept gives 0, not NaN.
    void_kept = kept_ce_loss(logits, torch.tensor([[[0, 1], [V, V]]]), torch.tensor([[[1, 0], [0, 1]]]))
    assert math.isclose(float(void_kept["total"]), _ce(LOGITS[0][0], 0), rel_tol=1e-6)
    assert float(kept_ce_loss(logits, torch.tensor([TARGET]), torch.zeros(1, 2, 2, dtype=torch.long))["total"]) == 0.0


class _Fixed(nn.Module):
    """A net whose logits are given: the step's loss is then the hand computation's."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.expand(x.shape[0], -1, -1, -1)}


def test_the_method_trains_one_net_on_the_masked_cross_entropy():
    assert METHODS["baseline_kept"].num_nets == 1
    cfg = load_config(REPO / "configs/demo_baseline.yaml", ["method.name=baseline_kept"])
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, strong_aug=dataclasses.replace(
        cfg.method.strong_aug, enabled=False)))
    logits = torch.tensor(LOGITS).permute(2, 0, 1)[None]
    batch = {"image": torch.zeros(1, 3, 2, 2), "label": torch.tensor([TARGET]), "mask": torch.tensor([MASK])}
    out = training_step([_Fixed(logits)], batch, 0, cfg, contextlib.nullcontext, torch.device("cpu"))
    assert math.isclose(float(out["total"]), (_ce(LOGITS[0][0], 0) + _ce(LOGITS[1][1], 2)) / 2, rel_tol=1e-6)

"""Label 255 (void) under mask 0: an unreliable pixel without a class (issue 25).

The CE terms skip it (mask 0, and 255 is CE's ignore index), the co-training terms cover it
(each net learns the other's hard prediction there, whatever the label). Checked on the loss
against a hand computation, and on the whole training step (engine/beco.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from engine.beco import training_step
from engine.config import load_config
from losses.beco_loss import beco_loss
from tests.conftest import REPO

V = 255
# 4x4 pixels, 3 classes. Void only where the mask is 0.
TARGET = [[0, 0, 1, 1],
          [0, V, 1, 1],
          [2, 2, V, 1],
          [2, 2, 0, V]]
MASK = [[1, 1, 1, 0],
        [1, 0, 1, 1],
        [1, 0, 0, 1],
        [0, 1, 1, 0]]
BAND = [[0, 1, 1, 0],
        [0, 1, 1, 0],
        [1, 1, 1, 1],
        [0, 0, 0, 0]]
# Logits (class 0, class 1, class 2) of each pixel, row by row; no ties, so each argmax is plain.
NET1 = [[(2.0, 0.5, -1.0), (1.0, 0.0, 0.5), (0.0, 2.0, 1.0), (-1.0, 1.5, 0.0)],
        [(1.5, -0.5, 0.0), (0.3, 0.1, 0.9), (0.5, 1.0, -2.0), (0.0, 3.0, 1.0)],
        [(0.0, 0.5, 2.5), (1.0, 0.0, 1.2), (2.0, 1.0, 0.0), (0.2, 0.8, -0.4)],
        [(-0.5, 0.0, 1.0), (0.0, -1.0, 0.7), (1.1, 0.9, 0.0), (0.0, 0.4, 2.0)]]
NET2 = [[(1.0, 0.0, 0.0), (0.0, 0.5, 1.5), (1.0, 1.0, 2.0), (0.5, 0.0, -0.5)],
        [(2.0, 1.0, 0.5), (-1.0, 2.0, 0.0), (0.0, 0.5, 0.2), (1.0, 2.0, 3.0)],
        [(0.1, 0.0, 1.0), (0.0, 1.5, 0.2), (0.0, 0.3, 1.8), (2.2, 0.0, 0.1)],
        [(1.0, 1.4, 0.0), (0.0, 0.0, 0.9), (0.6, 0.0, 0.2), (0.0, 1.0, 0.1)]]


def _method(**over):
    cfg = load_config(REPO / "configs/beco_voc.yaml").method
    return dataclasses.replace(cfg, **over)


def _logits(pixels) -> torch.Tensor:
    """(1, C, 4, 4) from rows of per-pixel class tuples."""
    return torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0)


def _nll(logits: tuple[float, ...], cls: int) -> float:
    """-log softmax(logits)[cls], written out."""
    return -(logits[cls] - math.log(sum(math.exp(v) for v in logits)))


def _argmax(logits: tuple[float, ...]) -> int:
    return max(range(len(logits)), key=lambda c: logits[c])


def _by_hand(w_hb: float, w_hi: float, w_lb: float, w_li: float) -> dict[str, float]:
    sums = dict(ce1=0.0, ce2=0.0, cot1=0.0, cot2=0.0)
    for y in range(4):
        for x in range(4):
            a, b, t, m, band = NET1[y][x], NET2[y][x], TARGET[y][x], MASK[y][x], BAND[y][x]
            if m == 1:
                assert t != V  # the rule the data checks enforce
                sums["ce1"] += _nll(a, t) * (1 + w_hb * band)
                sums["ce2"] += _nll(b, t) * (1 + w_hi * band)
            else:  # the target, void or not, plays no part here
                sums["cot1"] += _nll(a, _argmax(b)) * (1 + w_lb * band)
                sums["cot2"] += _nll(b, _argmax(a)) * (1 + w_li * band)
    return {k: v / 16 for k, v in sums.items()}  # the mean is over all pixels, masked or not


def test_loss_on_4x4_with_void_under_mask_0_equals_hand_computation():
    weights = dict(w_hb=0.2, w_hi=0.5, w_lb=0.3, w_li=0.7)
    out = beco_loss(_logits(NET1), _logits(NET2), torch.tensor([TARGET]), torch.tensor([MASK]),
                    torch.tensor([BAND], dtype=torch.float32), _method(**weights))
    want = _by_hand(**weights)
    for k in ("ce1", "ce2", "cot1", "cot2"):
        assert out[k].item() == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    assert out["total"].item() == pytest.approx(sum(want.values()), rel=1e-6)
    assert min(want.values()) > 0  # every term is exercised


def test_void_pixels_get_the_co_training_term_and_no_ce_term():
    """Per pixel: the void pixels under mask 0 carry exactly the co-training loss of their logits."""
    m = _method(w_hb=0.0, w_hi=0.0, w_lb=0.0, w_li=0.0)
    l1, l2 = _logits(NET1).requires_grad_(), _logits(NET2).requires_grad_()
    out = beco_loss(l1, l2, torch.tensor([TARGET]), torch.tensor([MASK]), torch.zeros(1, 4, 4), m)
    (out["ce1"] + out["ce2"]).backward(retain_graph=True)
    void = torch.tensor([TARGET]) == V
    assert torch.count_nonzero(l1.grad.permute(0, 2, 3, 1)[void]) == 0  # CE: no gradient at void pixels
    l1.grad = None
    out["cot1"].backward()
    assert (l1.grad.permute(0, 2, 3, 1)[void].abs().sum(-1) > 0).all()  # co-training: every void pixel


# ----------------------------------------------------------------------------- the training step


class FixedLogits(nn.Module):
    """A "net" whose logits are a parameter, the same for every image: the step's mixing and
    labels can then be compared across batches without the images mattering."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.expand(images.shape[0], -1, -1, -1)}


def _cfg(*overrides: str):
    return load_config(REPO / "configs/beco_voc.yaml", ["data.num_classes=3", "method.strong_aug.enabled=false",
                                                         "train.channels_last=false", *overrides])


def _batch(label: list) -> dict:
    """Two samples (BECO mixes halves): the 4x4 case and its mirror image."""
    t = torch.tensor([label, [row[::-1] for row in label]])
    mask = torch.tensor([MASK, [row[::-1] for row in MASK]])
    images = torch.linspace(-1, 1, 2 * 3 * 16).reshape(2, 3, 4, 4)
    return {"image": images, "label": t, "mask": mask}


def _step(nets, batch, epoch, cfg) -> dict[str, torch.Tensor]:
    return training_step(nets, batch, epoch, cfg, contextlib.nullcontext, torch.device("cpu"),
                         random.Random(7), np.random.RandomState(7))


def _nets(net2=NET2) -> list[nn.Module]:
    return [FixedLogits(_logits(NET1)), FixedLogits(_logits(net2))]


VOID = [[int(t == V) for t in row] for row in TARGET]
# Cases of the step, with the classes the void pixels may take instead without any term
# changing: no mixing; warm-up mixing (the offline labels are pasted); after warm-up with
# every sample kept (offline labels; the online ones are computed but not used). In warm-up a
# labelled pixel of the source is pasted with its class's region whatever its mask, a void
# one never (it has no class): only a class that is never pasted (background) leaves the
# paste as it is there.
CASES = {"no mixing": (["method.mixing=false"], 0, (0, 1, 2)),
         "warm-up mixing": (["method.mix_prob=1.0", "method.ignore_background=true"], 0, (0,)),
         "after warm-up, unmixed": (["method.mix_prob=0.0"], 1, (0, 1, 2))}


@pytest.mark.parametrize("case", list(CASES))
def test_step_accepts_void_under_mask_0_and_trains_it_by_co_training_only(case):
    overrides, epoch, classes = CASES[case]
    cfg = _cfg(*overrides)
    with_void = _step(_nets(), _batch(TARGET), epoch, cfg)
    assert all(torch.isfinite(v) for v in with_void.values())
    assert with_void["cot1"].item() > 0 and with_void["ce1"].item() > 0
    # The same pixels labelled with a class: mask 0 keeps the CE terms blind to them.
    for cls in classes:
        labelled = [[cls if t == V else t for t in row] for row in TARGET]
        other = _step(_nets(), _batch(labelled), epoch, cfg)
        for k in ("ce1", "ce2", "cot1", "cot2"):
            assert other[k].item() == pytest.approx(with_void[k].item(), rel=1e-6), (cls, k)
    # The co-training terms cover the void pixels: net2 predicting another class only there
    # changes net1's co-training term, and the CE terms do not move.
    flipped = [[(p[2], p[0], p[1]) if VOID[y][x] else p for x, p in enumerate(row)] for y, row in enumerate(NET2)]
    assert all(_argmax(flipped[y][x]) != _argmax(NET2[y][x]) for y in range(4) for x in range(4) if VOID[y][x])
    moved = _step(_nets(flipped), _batch(TARGET), epoch, cfg)
    assert moved["cot1"].item() != pytest.approx(with_void["cot1"].item(), rel=1e-4)
    assert moved["ce1"].item() == pytest.approx(with_void["ce1"].item(), rel=1e-6)

"""Each loss term against a hand computation on hand-made logits (spec second-stage §4.4)."""
from __future__ import annotations

import math

import pytest
import torch

from losses.beco_loss import baseline_loss, beco_loss
from tests.conftest import REPO
from engine.config import load_config


def _cfg(**over):
    cfg = load_config(REPO / "configs/beco_voc.yaml").method
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _ce(logit_vec, cls):
    return -logit_vec[cls] + math.log(sum(math.exp(v) for v in logit_vec))


# One image, 1x3 pixels, 2 classes. Logits per pixel (class0, class1):
L1 = [(2.0, 0.0), (0.0, 1.0), (0.5, 0.5)]   # net1 argmax: 0, 1, 0 (tie -> first)
L2 = [(0.0, 3.0), (1.0, 0.0), (0.0, 2.0)]   # net2 argmax: 1, 0, 1
TARGET = [0, 1, 255]
MASK = [1, 0, 1]
BAND = [1, 1, 0]


def _tensor(pixels):
    return torch.tensor(pixels).t().reshape(1, 2, 1, 3)


def test_each_term_matches_hand_computation():
    cfg = _cfg(w_hb=0.2, w_hi=0.5, w_lb=0.3, w_li=0.7)
    out = beco_loss(_tensor(L1), _tensor(L2), torch.tensor([TARGET]).reshape(1, 1, 3),
                    torch.tensor([MASK]).reshape(1, 1, 3), torch.tensor([BAND]).reshape(1, 1, 3), cfg)
    n = 3  # mean over all pixels, not over the masked ones
    # ce terms: pixel 0 reliable + band, pixel 1 unreliable, pixel 2 reliable but ignored (255).
    ce1 = _ce(L1[0], 0) * 1 * (1 + 0.2 * 1) / n
    ce2 = _ce(L2[0], 0) * 1 * (1 + 0.5 * 1) / n
    # cot terms: only pixel 1 is unreliable; net1 learns net2's argmax (0), net2 learns net1's (1).
    cot1 = _ce(L1[1], 0) * (1 + 0.3 * 1) / n
    cot2 = _ce(L2[1], 1) * (1 + 0.7 * 1) / n
    assert out["ce1"].item() == pytest.approx(ce1, rel=1e-6)
    assert out["ce2"].item() == pytest.approx(ce2, rel=1e-6)
    assert out["cot1"].item() == pytest.approx(cot1, rel=1e-6)
    assert out["cot2"].item() == pytest.approx(cot2, rel=1e-6)
    assert out["total"].item() == pytest.approx(ce1 + ce2 + cot1 + cot2, rel=1e-6)


def test_no_gradient_through_hard_targets():
    l1 = _tensor(L1).requires_grad_()
    l2 = _tensor(L2).requires_grad_()
    zeros = torch.zeros(1, 1, 3, dtype=torch.long)
    out = beco_loss(l1, l2, zeros, zeros, zeros.float(), _cfg())  # everything unreliable
    out["cot1"].backward()
    assert l2.grad is None or torch.count_nonzero(l2.grad) == 0  # cot1 reaches net1 only
    assert torch.count_nonzero(l1.grad) > 0


def test_co_training_off_leaves_reliable_terms_only():
    out = beco_loss(_tensor(L1), _tensor(L2), torch.tensor([TARGET]).reshape(1, 1, 3),
                    torch.tensor([MASK]).reshape(1, 1, 3), torch.tensor([BAND]).reshape(1, 1, 3),
                    _cfg(), co_training=False)
    assert out["cot1"].item() == 0 and out["cot2"].item() == 0
    assert out["total"].item() == pytest.approx((out["ce1"] + out["ce2"]).item())


def test_baseline_is_mean_over_labelled_pixels():
    out = baseline_loss(_tensor(L1), torch.tensor([TARGET]).reshape(1, 1, 3))
    assert out["total"].item() == pytest.approx((_ce(L1[0], 0) + _ce(L1[1], 1)) / 2, rel=1e-6)

"""The four-term BECO loss (spec second-stage §4.4) and the baseline's plain cross entropy.

The last of the three files one training iteration reads through: engine/trainer.py (the loop)
-> engine/beco.py (``training_step``) -> here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.config import MethodCfg
from utils.voc import IGNORE_INDEX


def beco_loss(logits1: torch.Tensor, logits2: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              band: torch.Tensor, cfg: MethodCfg, co_training: bool = True) -> dict[str, torch.Tensor]:
    """L_ce1 + L_ce2 + L_cot1 + L_cot2, each a mean over all B*H*W pixels.

    ``target`` (B,H,W) long with 255 ignored, ``mask`` (B,H,W) 1 = reliable, ``band``
    (B,H,W) the artificial boundary of the mixing. Reliable pixels learn the
    target, weighted up on the band; uncertain pixels learn the other net's hard
    prediction (co-training). ``co_training`` False drops the two co-training
    terms, so each net learns only from reliable pixels; the training step passes
    ``cfg.co_training`` combined with ``cfg.co_training_start_epoch``.
    """
    mask = mask.float()
    band = band.float()
    ce1 = F.cross_entropy(logits1, target, ignore_index=IGNORE_INDEX, reduction="none")
    ce2 = F.cross_entropy(logits2, target, ignore_index=IGNORE_INDEX, reduction="none")
    losses = {
        "ce1": (ce1 * mask * (1 + cfg.w_hb * band)).mean(),
        "ce2": (ce2 * mask * (1 + cfg.w_hi * band)).mean(),
    }
    if co_training:
        # Hard predictions are targets: no gradient flows through the argmax.
        p1 = logits1.detach().argmax(1)
        p2 = logits2.detach().argmax(1)
        unreliable = 1 - mask
        losses["cot1"] = (F.cross_entropy(logits1, p2, reduction="none") * unreliable * (1 + cfg.w_lb * band)).mean()
        losses["cot2"] = (F.cross_entropy(logits2, p1, reduction="none") * unreliable * (1 + cfg.w_li * band)).mean()
    else:
        zero = logits1.new_zeros(())
        losses["cot1"] = losses["cot2"] = zero
    losses["total"] = losses["ce1"] + losses["ce2"] + losses["cot1"] + losses["cot2"]
    return losses


def kept_ce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross entropy averaged over the reliable pixels only (mask 1, label not 255): the baseline
    that trusts the confidence mask and drops the rest (``baseline_kept``, the mask study)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    kept = (mask > 0) & (target != IGNORE_INDEX)
    # clamp, not a Python max: the count stays on the device (no host sync); none kept gives 0.
    loss = (ce * kept).sum() / kept.sum().clamp(min=1)
    return {"ce1": loss, "total": loss}


def baseline_loss(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain cross entropy over every pseudo-labelled pixel (the ablation's single-net baseline)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    return {"ce1": ce, "total": ce}

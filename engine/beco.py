"""One training iteration of each method, and the table that picks one by ``method.name``.

BECO (spec second-stage §4): online labels, boundary-enhanced mixing, strong
augmentation, the two nets' forward passes and the four-term loss. The baseline is
one net trained with plain cross entropy on the offline pseudo-labels, for the ablation.

One iteration: engine/trainer.py's loop calls ``training_step`` here, which returns the loss
terms of losses/beco_loss.py.
"""
from __future__ import annotations

import random
from contextlib import AbstractContextManager
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from engine.evaluate import average_logits
from engine.mixing import mix_batch
from engine.strong_aug import strong_augment
from losses.beco_loss import baseline_loss, beco_loss, kept_ce_loss
from models.checkpoint import unwrap
from utils.config import Config
from utils.runtime import net_input


# On the CPU the logits go through in pieces of this many pixels (2.75 MB of float32
# logits at 21 classes), so each piece stays in cache through the passes below; the result does
# not depend on it. A GPU takes the whole batch at once.
_CPU_CHUNK_PIXELS = 1 << 15


def confident_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of (B,C,H,W) logits: the argmax class (the first of ties) and
    [max softmax probability > threshold], both (B,H,W) int64.

    The top probability is 1 / Σ_c exp(l_c − max), softmax's own value at its top,
    found without writing the (B,C,H,W) softmax. It can differ from ``softmax`` in
    the last bit (its exp is another implementation), so only a pixel within ~1e-6 of
    the threshold can differ. The argmax avoids the index-returning max and float
    compares, both slow on the CPU: t = l − max is +0.0 exactly at the max and negative
    elsewhere, so as int32 bits it is 0 there and below −2^23 elsewhere; adding
    rank_c = C − c and taking the integer max gives C minus the first class at the max.
    """
    b, c = logits.shape[:2]
    flat = logits.reshape(b, c, -1)
    first = torch.empty(b, flat.shape[2], dtype=torch.int32, device=logits.device)
    confident = torch.empty(b, flat.shape[2], dtype=torch.bool, device=logits.device)
    rank = torch.arange(c, 0, -1, dtype=torch.int32, device=logits.device).view(1, c, 1)
    on_cpu = logits.device.type == "cpu"
    step = _CPU_CHUNK_PIXELS if on_cpu else flat.shape[2]
    for i in range(b if on_cpu else 1):
        rows = slice(i, i + 1) if on_cpu else slice(None)
        for j in range(0, flat.shape[2], step):
            t = flat[rows, :, j:j + step].float()
            t = t - t.amax(1, keepdim=True)
            torch.amax(t.view(torch.int32) + rank, 1, out=first[rows, j:j + step])
            torch.gt(t.exp_().sum(1).reciprocal_(), threshold, out=confident[rows, j:j + step])
    shape = (b, *logits.shape[2:])
    label = (c - first.long()).clamp_(0, c - 1)  # the clamp: NaN logits have no +0.0
    return label.view(shape), confident.long().view(shape)


@torch.no_grad()
def online_labels(nets: list[nn.Module], images: torch.Tensor, threshold: float,
                  autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and [confidence > threshold] of the nets' averaged logits, computed in eval mode."""
    for n in nets:
        n.eval()
    with autocast():
        logits = average_logits(nets, images)
    for n in nets:
        n.train()
    return confident_labels(logits, threshold)


def augment(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Strong augmentation runs on 0..255 images, so undo and redo the normalisation around it."""
    if not cfg.method.strong_aug.enabled:
        return images
    return strong_augment(images, cfg.method.strong_aug, None, mean=cfg.data.mean, std=cfg.data.std)


def baseline_step(nets: list[nn.Module], batch: dict, epoch: int, cfg: Config,
                  autocast: Callable[[], AbstractContextManager], device: torch.device,
                  py_rng=random, np_rng=np.random) -> dict[str, torch.Tensor]:
    """Plain cross entropy of the one net on the (strongly augmented, if enabled) batch."""
    label = batch["label"].to(device, non_blocking=True)
    return baseline_loss(_single_net_logits(nets, batch, cfg, autocast, device), label)


def baseline_kept_step(nets: list[nn.Module], batch: dict, epoch: int, cfg: Config,
                       autocast: Callable[[], AbstractContextManager], device: torch.device,
                       py_rng=random, np_rng=np.random) -> dict[str, torch.Tensor]:
    """The baseline's cross entropy on the reliable pixels only (mask 1)."""
    label = batch["label"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    return kept_ce_loss(_single_net_logits(nets, batch, cfg, autocast, device), label, mask)


def _single_net_logits(nets: list[nn.Module], batch: dict, cfg: Config,
                       autocast: Callable[[], AbstractContextManager], device: torch.device) -> torch.Tensor:
    images = batch["image"].to(device, non_blocking=True)
    with autocast():
        logits = nets[0](net_input(augment(images, cfg), cfg))["logits"]
    return logits.float()


def beco_step(nets: list[nn.Module], batch: dict, epoch: int, cfg: Config,
              autocast: Callable[[], AbstractContextManager], device: torch.device,
              py_rng=random, np_rng=np.random) -> dict[str, torch.Tensor]:
    """Forward both nets on the mixed, augmented batch; return the loss terms (``total`` to backprop).

    ``nets`` may be DDP-wrapped; the no-grad online-label pass uses the bare modules
    so DDP sees exactly one forward per backward.
    """
    images = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    method = cfg.method

    warmup = epoch < method.warmup_epochs
    band = torch.zeros_like(mask, dtype=torch.float32)
    if method.mixing:
        online_label = online_mask = None
        if not warmup:
            bare = [unwrap(n) for n in nets]
            online_label, online_mask = online_labels(bare, net_input(images, cfg), method.threshold, autocast)
        mixed = mix_batch(images, label, mask, online_label, online_mask, warmup, method,
                          cfg.data.num_classes, py_rng, np_rng)
        images, label, mask, band = mixed["images"], mixed["target"], mixed["mask"], mixed["band"]
    images = net_input(augment(images, cfg), cfg)
    with autocast():
        logits1 = nets[0](images)["logits"]
        logits2 = nets[1](images)["logits"]
    co_training = method.co_training and epoch >= method.co_training_start_epoch
    return beco_loss(logits1.float(), logits2.float(), label, mask, band, method, co_training)


class Method(NamedTuple):
    num_nets: int   # nets built, trained, checkpointed (network1, network2) and averaged at test time
    step: Callable[..., dict[str, torch.Tensor]]
    # Why the per-process batch must be even, as the config's error says it (None: any size).
    even_batch_reason: str | None


# The one place that knows the methods: the config checks method.name against this table
# (handed to it by engine/config.py), in this order.
METHODS: dict[str, Method] = {
    "beco": Method(2, beco_step, "BECO mixes batch halves"),
    "baseline": Method(1, baseline_step, None),
    "baseline_kept": Method(1, baseline_kept_step, None),
}


def num_nets(cfg: Config) -> int:
    return METHODS[cfg.method.name].num_nets


def training_step(nets: list[nn.Module], batch: dict, epoch: int, cfg: Config,
                  autocast: Callable[[], AbstractContextManager], device: torch.device,
                  py_rng=random, np_rng=np.random) -> dict[str, torch.Tensor]:
    """The configured method's iteration: its loss terms, ``total`` to backprop."""
    return METHODS[cfg.method.name].step(nets, batch, epoch, cfg, autocast, device, py_rng, np_rng)

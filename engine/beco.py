"""One training iteration of each method, and the table that picks one by ``method.name``.

BECO (spec second-stage §4): online labels, boundary-enhanced mixing, strong
augmentation, the two nets' forward passes and the four-term loss. The baseline is
one net trained with plain cross entropy on the offline pseudo-labels, for the ablation.
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
from engine.strong_aug import denormalize, normalize, strong_augment
from losses.beco_loss import baseline_loss, beco_loss
from models.checkpoint import unwrap
from utils.config import Config


@torch.no_grad()
def online_labels(nets: list[nn.Module], images: torch.Tensor, threshold: float,
                  autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and [confidence > threshold] of the nets' averaged softmax, computed in eval mode."""
    for n in nets:
        n.eval()
    with autocast():
        logits = average_logits(nets, images)
    prob, label = logits.float().softmax(1).max(1)
    for n in nets:
        n.train()
    return label, (prob > threshold).long()


def augment(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Strong augmentation runs on 0..255 images, so undo and redo the normalisation around it."""
    if not cfg.method.strong_aug.enabled:
        return images
    raw = denormalize(images, cfg.data.mean, cfg.data.std)
    return normalize(strong_augment(raw, cfg.method.strong_aug, None), cfg.data.mean, cfg.data.std)


def baseline_step(nets: list[nn.Module], batch: dict, epoch: int, cfg: Config,
                  autocast: Callable[[], AbstractContextManager], device: torch.device,
                  py_rng=random, np_rng=np.random) -> dict[str, torch.Tensor]:
    """Plain cross entropy of the one net on the (strongly augmented, if enabled) batch."""
    images = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    with autocast():
        logits = nets[0](augment(images, cfg))["logits"]
    return baseline_loss(logits.float(), label)


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
            online_label, online_mask = online_labels(bare, images, method.threshold, autocast)
        mixed = mix_batch(images, label, mask, online_label, online_mask, warmup, method,
                          cfg.data.num_classes, py_rng, np_rng)
        images, label, mask, band = mixed["images"], mixed["target"], mixed["mask"], mixed["band"]
    images = augment(images, cfg)
    with autocast():
        logits1 = nets[0](images)["logits"]
        logits2 = nets[1](images)["logits"]
    co_training = method.co_training and epoch >= method.co_training_start_epoch
    return beco_loss(logits1.float(), logits2.float(), label, mask, band, method, co_training)


class Method(NamedTuple):
    num_nets: int   # nets built, trained, checkpointed (network1, network2) and averaged at test time
    step: Callable[..., dict[str, torch.Tensor]]


METHODS: dict[str, Method] = {
    "beco": Method(2, beco_step),
    "baseline": Method(1, baseline_step),
}


def num_nets(cfg: Config) -> int:
    return METHODS[cfg.method.name].num_nets


def training_step(nets: list[nn.Module], batch: dict, epoch: int, cfg: Config,
                  autocast: Callable[[], AbstractContextManager], device: torch.device,
                  py_rng=random, np_rng=np.random) -> dict[str, torch.Tensor]:
    """The configured method's iteration: its loss terms, ``total`` to backprop."""
    return METHODS[cfg.method.name].step(nets, batch, epoch, cfg, autocast, device, py_rng, np_rng)

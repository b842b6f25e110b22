"""The segmenter table and the one place that builds nets and their optimiser.

A segmenter is one file (its config dataclass, `build(cfg, num_classes,
pretrained)` and `checkpoint_filter_fn`), one YAML of its values under
`configs/model/`, and one line in `MODELS`. Training, testing, benchmarks and
tests all build through `build_model`; the config loader validates the `model`
section against the dataclass the section's `name` picks here (`MODELS`,
`OPTIMIZERS` and `BACKBONES` reach it through `engine/config.py`).

Every segmenter has a `backbone` submodule (what ImageNet weights initialise)
and returns a dict with `logits` (input size) and `pre_logits` (its head's
resolution); everything outside `backbone` is the head, for `head_lr_mult`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import deeplabv2, deeplabv3plus, mit, resnet, segformer
from .checkpoint import unwrap


class ModelEntry(NamedTuple):
    config: type                                   # the dataclass that declares the section's keys
    build: Callable[[Any, int, bool], nn.Module]   # (section, num_classes, load ImageNet weights) -> net


MODELS: dict[str, ModelEntry] = {
    "deeplabv3plus": ModelEntry(deeplabv3plus.DeepLabV3PlusCfg, deeplabv3plus.build),
    "deeplabv2": ModelEntry(deeplabv2.DeepLabV2Cfg, deeplabv2.build),
    "segformer": ModelEntry(segformer.SegFormerCfg, segformer.build),
}


# model.backbone.<key> -> (family, the family's own table of what it builds): the config loader
# refuses a ResNet depth or MiT variety outside it, naming the key, before any net is built.
BACKBONES: dict[str, tuple[str, Mapping[Any, Any]]] = {
    "depth": ("ResNet", resnet.STAGE_BLOCKS),
    "variety": ("MiT", mit.VARIETIES),
}


def build_model(model_cfg: Any, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The segmenter of a validated `model` section. `num_classes` comes from the
    data set (QUIRK-S1); `pretrained=False` skips the ImageNet file, for nets
    whose every weight a checkpoint is about to replace."""
    if model_cfg.name not in MODELS:
        raise ValueError(f"unknown segmenter {model_cfg.name!r}; expected one of {sorted(MODELS)}")
    return MODELS[model_cfg.name].build(model_cfg, num_classes, pretrained)


# ----------------------------------------------------------------------------- optimiser

@dataclass
class SGDCfg:
    name: Literal["sgd"]
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float
    min_lr: float
    head_lr_mult: Optional[float]   # null: one group per net (the reference); a number: head lr = lr x it
    implementation: Literal["default", "foreach", "fused"]


@dataclass
class AdamWCfg:
    name: Literal["adamw"]
    lr: float
    betas: list[float]
    eps: float
    weight_decay: float
    poly_power: float
    min_lr: float
    head_lr_mult: Optional[float]
    implementation: Literal["default", "foreach", "fused"]


def param_groups(nets: Sequence[nn.Module], lr: float, head_lr_mult: Optional[float]) -> list[dict]:
    """Without a head multiplier, one group per net holding all its parameters
    (the reference's layout, so its optimiser state dicts keep loading). With
    one, two per net: the backbone at `lr`, the rest at `lr * head_lr_mult`."""
    if head_lr_mult is None:
        return [{"params": list(net.parameters())} for net in nets]
    groups = []
    for net in nets:
        named = list(unwrap(net).named_parameters())
        groups.append({"params": [p for n, p in named if n.startswith("backbone.")], "lr": lr})
        groups.append({"params": [p for n, p in named if not n.startswith("backbone.")], "lr": lr * head_lr_mult})
    return groups


def _implementation(c: Any) -> dict:
    """torch's keyword for ``optim.implementation``: its own choice (the reference's), the
    multi-tensor ``foreach`` kernels, or one ``fused`` kernel for all parameters."""
    return {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[c.implementation]


def _sgd(groups: list[dict], c: SGDCfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, **_implementation(c))


def _adamw(groups: list[dict], c: AdamWCfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay,
                             **_implementation(c))


class OptimizerEntry(NamedTuple):
    config: type
    make: Callable[[list[dict], Any], torch.optim.Optimizer]


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(SGDCfg, _sgd),
    "adamw": OptimizerEntry(AdamWCfg, _adamw),
}


def build_optimizer(nets: Sequence[nn.Module], optim_cfg: Any) -> torch.optim.Optimizer:
    """The `optim` section's optimiser over the nets' parameter groups: SGD, the
    reference's for every segmenter (QUIRK-S12), or AdamW. Weight decay applies to
    every parameter, norms and biases included, as in the reference."""
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {optim_cfg.name!r}; expected one of {sorted(OPTIMIZERS)}")
    groups = param_groups(nets, optim_cfg.lr, optim_cfg.head_lr_mult)
    return OPTIMIZERS[optim_cfg.name].make(groups, optim_cfg)

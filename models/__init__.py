"""Segmentation networks of the second stage."""
from __future__ import annotations

from typing import Any, Mapping

from .checkpoint import (
    CheckpointMismatchError,
    detect_and_map,
    load_backbone_weights,
    mmcls_to_ours,
    strip_module_prefix,
    torchvision_to_ours,
)
from .deeplabv3plus import DeepLabV3Plus
from .resnetv1d import ResNetV1d, make_norm_layer


def build_model(cfg: Mapping[str, Any]) -> DeepLabV3Plus:
    """Build the network from `{"backbone": {...}, "decoder": {...}}`; any
    other top-level key is an error."""
    unknown = sorted(set(cfg) - {"backbone", "decoder"})
    if unknown:
        raise ValueError(f"unknown model config key(s): {', '.join(unknown)}; known keys: backbone, decoder")
    return DeepLabV3Plus(backbone=cfg.get("backbone"), decoder=cfg.get("decoder"))


__all__ = [
    "CheckpointMismatchError",
    "DeepLabV3Plus",
    "ResNetV1d",
    "build_model",
    "detect_and_map",
    "load_backbone_weights",
    "make_norm_layer",
    "mmcls_to_ours",
    "strip_module_prefix",
    "torchvision_to_ours",
]

"""Segmentation networks of the second stage, built by name from `build.MODELS`."""
from __future__ import annotations

from .build import MODELS, OPTIMIZERS, build_model, build_optimizer, param_groups
from .checkpoint import CheckpointMismatchError, load_pretrained
from .deeplabv2 import DeepLabV2
from .deeplabv3plus import DeepLabV3Plus
from .resnet import ResNet, make_norm_layer
from .segformer import SegFormer

__all__ = [
    "CheckpointMismatchError",
    "DeepLabV2",
    "DeepLabV3Plus",
    "MODELS",
    "OPTIMIZERS",
    "ResNet",
    "SegFormer",
    "build_model",
    "build_optimizer",
    "load_pretrained",
    "make_norm_layer",
    "param_groups",
]

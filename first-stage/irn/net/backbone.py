"""The first stage's backbone (spec §5): ``models/resnet.py``'s IRN ResNet, its ImageNet
weights, and the names its weights files keep.

IRN's ResNet is torchvision's with stage strides (1, 2, 2, 1) and layer4 not dilated -> output
stride 16, and every BatchNorm fixed: it normalises with the ImageNet statistics and never
updates them, whatever the train/eval flag. Depth 50 is the reference; 18/34 use basic blocks
so CPU runs stay affordable. No average pool or fc head.

The files train_cam and train_irn write (``sess/res*_cam.pth``, ``sess/res*_irn.pth``) keep
torchvision's stem names under ``backbone.`` (``backbone.conv1.weight``), as they always had:
``file_state`` writes those names and ``checkpoint_filter_fn`` reads them.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from torch import Tensor, nn

from models.checkpoint import StateDict, load_pretrained
from models.resnet import ResNet, irn_resnet, plain_stem_filter, plain_stem_key

# --backbone_bn -> the norm layer. "batch" (ordinary BatchNorm) is not the reference: only for
# training from scratch, where normalising with untrained statistics (mean 0, var 1) leaves the
# network unable to learn.
NORM_LAYERS = {"fixed": "FixedBN", "batch": "BN"}

_BACKBONE = "backbone."
_MODEL_STEM = _BACKBONE + "stem_layer."


def resnet(depth: int, bn_mode: str = "fixed") -> ResNet:
    """IRN's ResNet with random weights; ``bn_mode`` "fixed" is the reference's BatchNorm."""
    if bn_mode not in NORM_LAYERS:
        raise ValueError(f"bn_mode must be one of {tuple(NORM_LAYERS)}, got {bn_mode!r}")
    return irn_resnet(depth, NORM_LAYERS[bn_mode])


def build_backbone(depth: int, weights: str | Path | None = None, bn_mode: str = "fixed") -> ResNet:
    """IRN's ResNet; ``weights`` = a torchvision ImageNet file (every key but ``fc.*`` must
    match), None = random init, loudly warned."""
    model = resnet(depth, bn_mode)
    if weights is None or str(weights) == "":
        warnings.warn(
            "\n" + "!" * 78 + f"\n!! NO IMAGENET WEIGHTS for the ResNet-{depth} backbone: training from SCRATCH.\n"
            "!! Results will be far below the reference (fine for the synthetic demo, not for VOC).\n"
            "!! Pass --backbone_weights PATH (torchvision resnet file, e.g. resnet50-19c8e357.pth).\n"
            + "!" * 78, UserWarning, stacklevel=2)
    else:
        load_pretrained(model, weights, plain_stem_filter, "backbone_weights", counters_from_file=True)
    return model


def checkpoint_filter_fn(state_dict: dict[str, Tensor]) -> StateDict:
    """A first-stage weights file -> the network's names (``backbone.conv1.*`` ->
    ``backbone.stem_layer.conv1.*``); a file with the network's own names passes unchanged."""
    return {(_BACKBONE + plain_stem_key(k[len(_BACKBONE):]) if k.startswith(_BACKBONE) else k): v
            for k, v in state_dict.items()}


def backbone_filter(state_dict: dict[str, Tensor]) -> StateDict:
    """A CAM weights file -> its backbone's entries under the backbone's own names."""
    return {plain_stem_key(k[len(_BACKBONE):]): v for k, v in state_dict.items() if k.startswith(_BACKBONE)}


def file_state(model: nn.Module) -> StateDict:
    """``model``'s state dict as the first stage writes it: on the CPU, the stem under
    torchvision's names (``backbone.stem_layer.conv1.*`` -> ``backbone.conv1.*``)."""
    return {(_BACKBONE + k[len(_MODEL_STEM):] if k.startswith(_MODEL_STEM) else k): v.detach().cpu()
            for k, v in model.state_dict().items()}


__all__ = ["NORM_LAYERS", "resnet", "build_backbone", "checkpoint_filter_fn", "backbone_filter", "file_state"]

"""DeepLabV3+ with a separable ASPP on a ResNetV1d backbone
(spec/second-stage.md §3).

Submodule and parameter names are the reference's, so its released
checkpoints load: `backbone.*`, `aspp.convs.*`, `aspp.projector.*`,
`projector.*`, `pre_classifier.convs.*`, `classifier.*`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_backbone_weights
from .resnetv1d import NormLayer, ResNetV1d, init_conv_and_norm, make_norm_layer

BACKBONE_DEFAULTS: Dict[str, Any] = {
    "depth": 101,
    "output_stride": 16,
    "multi_grid": [1, 2, 4],
    "contract_dilation": False,
    "norm_layer": "BN",
    "pretrained": None,
}

DECODER_DEFAULTS: Dict[str, Any] = {
    "num_classes": 21,
    "aspp_channels": 256,
    "aspp_dilations": [6, 12, 18],
    "low_level_channels": 48,
    "dropout": 0.1,
    "norm_layer": "BN",
    "align_corners": False,
}


def _with_defaults(cfg: Optional[Mapping[str, Any]], defaults: Mapping[str, Any], what: str) -> Dict[str, Any]:
    """Fill in defaults; a key we do not know is an error rather than silently
    ignored, because a misspelt key would otherwise fall back to the default."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} config key(s): {', '.join(unknown)}; known keys: {', '.join(defaults)}")
    return {**defaults, **cfg}


class SeparableConv(nn.Module):
    """Depthwise kxk conv -> norm -> ReLU -> pointwise 1x1 conv -> norm -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int,
        dilation: int,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                      groups=in_channels, bias=False),
            norm_layer(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class ImagePooling(nn.Module):
    """ASPP image-level branch: global context broadcast back to every pixel."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer, align_corners: bool) -> None:
        super().__init__()
        self.align_corners = align_corners
        # The pool sits at index 0 so conv/norm are `convs.1` / `convs.2`, as in the reference.
        self.convs = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.convs(x)
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


class SeparableASPP(nn.Module):
    """1x1 branch, one separable 3x3 branch per dilation, image pooling;
    concatenated and projected back to `channels`."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        dilations: Sequence[int],
        dropout: float,
        norm_layer: NormLayer,
        align_corners: bool,
    ) -> None:
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), norm_layer(channels),
                                  nn.ReLU(inplace=True))]
        for d in dilations:
            branches.append(SeparableConv(in_channels, channels, 3, padding=d, dilation=d, norm_layer=norm_layer))
        branches.append(ImagePooling(in_channels, channels, norm_layer, align_corners))
        self.convs = nn.ModuleList(branches)
        self.projector = nn.Sequential(
            nn.Conv2d(len(branches) * channels, channels, 1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        init_conv_and_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation network.

    Args:
        backbone: keys of `BACKBONE_DEFAULTS` (depth, output_stride,
            multi_grid, contract_dilation, norm_layer, pretrained).
        decoder: keys of `DECODER_DEFAULTS` (num_classes, aspp_channels,
            aspp_dilations, low_level_channels, dropout, norm_layer,
            align_corners).
    Unknown keys raise ValueError.

    forward(x) returns a dict: `logits` (N x C x H x W, the input's size),
    `pre_logits` (stride 4), `embeddings` (pre-classifier features, stride 4)
    and the backbone's `layer1`..`layer4` features.
    """

    def __init__(self, backbone: Optional[Mapping[str, Any]] = None,
                 decoder: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        bcfg = _with_defaults(backbone, BACKBONE_DEFAULTS, "backbone")
        dcfg = _with_defaults(decoder, DECODER_DEFAULTS, "decoder")
        self.align_corners = bool(dcfg["align_corners"])

        # Construction order mirrors the reference (backbone, ASPP, low-level
        # projector, pre-classifier, classifier, then the decoder re-init), so
        # with the same seed both draw identical initial weights.
        self.backbone = ResNetV1d(
            depth=bcfg["depth"],
            output_stride=bcfg["output_stride"],
            multi_grid=bcfg["multi_grid"],
            contract_dilation=bcfg["contract_dilation"],
            norm_layer=bcfg["norm_layer"],
        )
        if bcfg["pretrained"]:
            load_backbone_weights(self.backbone, bcfg["pretrained"])

        norm = make_norm_layer(dcfg["norm_layer"])
        high_channels = self.backbone.out_channels["layer4"]
        low_channels = self.backbone.out_channels["layer1"]
        channels = dcfg["aspp_channels"]
        projected = dcfg["low_level_channels"]

        self.aspp = SeparableASPP(high_channels, channels, dcfg["aspp_dilations"], dcfg["dropout"], norm,
                                  self.align_corners)
        self.projector = nn.Sequential(
            nn.Conv2d(low_channels, projected, 1, bias=False),
            norm(projected),
            nn.ReLU(inplace=True),
        )
        self.pre_classifier = SeparableConv(projected + channels, channels, 3, padding=1, dilation=1,
                                            norm_layer=norm)
        self.classifier = nn.Conv2d(channels, dcfg["num_classes"], 1)
        for module in (self.projector, self.pre_classifier, self.classifier):
            init_conv_and_norm(module)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = dict(self.backbone(x))
        low = self.projector(out["layer1"])
        high = self.aspp(out["layer4"])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        # Order [low-level, ASPP] matters: it fixes the pre-classifier's input channel layout.
        embeddings = self.pre_classifier(torch.cat([low, high], dim=1))
        pre_logits = self.classifier(embeddings)
        out["embeddings"] = embeddings
        out["pre_logits"] = pre_logits
        out["logits"] = F.interpolate(pre_logits, size=x.shape[-2:], mode="bilinear",
                                      align_corners=self.align_corners)
        return out

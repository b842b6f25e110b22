"""DeepLabV3+ with a separable ASPP on a ResNetV1d backbone
(spec/second-stage.md §3): the reference's default segmenter.

Submodule and parameter names are the reference's, so its released
checkpoints load: `backbone.*`, `aspp.convs.*`, `aspp.projector.*`,
`projector.*`, `pre_classifier.convs.*`, `classifier.*`. The values live in
`configs/model/deeplabv3plus.yaml`; `DeepLabV3PlusCfg` only declares the keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import StateDict, load_pretrained
from .resnet import NormLayer, NormName, ResNet, imagenet_resnet_keys, init_conv_and_norm, make_norm_layer


@dataclass
class BackboneCfg:
    depth: int
    output_stride: Literal[8, 16]
    multi_grid: list[int]           # empty: no multi-grid
    contract_dilation: bool
    norm_layer: NormName
    pretrained: Optional[str]       # ImageNet ResNetV1d file; null trains from scratch


@dataclass
class DecoderCfg:
    aspp_channels: int
    aspp_dilations: list[int]
    low_level_channels: int
    dropout: float
    norm_layer: NormName


@dataclass
class DeepLabV3PlusCfg:
    name: Literal["deeplabv3plus"]
    align_corners: bool
    backbone: BackboneCfg
    decoder: DecoderCfg


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
    """DeepLabV3+ segmentation network on a built ResNet backbone.

    forward(x) returns a dict: `logits` (N x C x H x W, the input's size),
    `pre_logits` (stride 4), `embeddings` (pre-classifier features, stride 4)
    and the backbone's `layer1`..`layer4` features.
    """

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        *,
        aspp_channels: int,
        aspp_dilations: Sequence[int],
        low_level_channels: int,
        dropout: float,
        norm_layer: str,
        align_corners: bool,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        # Construction order mirrors the reference (backbone, ASPP, low-level
        # projector, pre-classifier, classifier, then the decoder re-init), so
        # with the same seed both draw identical initial weights.
        self.backbone = backbone
        norm = make_norm_layer(norm_layer)
        high_channels = backbone.out_channels["layer4"]
        low_channels = backbone.out_channels["layer1"]
        self.aspp = SeparableASPP(high_channels, aspp_channels, aspp_dilations, dropout, norm, align_corners)
        self.projector = nn.Sequential(
            nn.Conv2d(low_channels, low_level_channels, 1, bias=False),
            norm(low_level_channels),
            nn.ReLU(inplace=True),
        )
        self.pre_classifier = SeparableConv(low_level_channels + aspp_channels, aspp_channels, 3, padding=1,
                                            dilation=1, norm_layer=norm)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
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


_MMCLS_STEM = re.compile(r"^stem\.(\d+)\.(conv|bn)\.(.+)$")


def _mmcls_stem_key(key: str) -> str:
    """`stem.<i>.conv.*` -> `stem_layer.conv<i+1>.*`, `stem.<i>.bn.*` -> `stem_layer.bn<i+1>.*`."""
    match = _MMCLS_STEM.match(key)
    if match is None:
        return key
    index, kind, rest = match.groups()
    return f"stem_layer.{kind}{int(index) + 1}.{rest}"


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor]) -> StateDict:
    """ImageNet ResNetV1d weights -> the backbone's names (spec second-stage §3).

    Accepts mmclassification's file (`backbone.` prefix, deep stem as
    `stem.<i>.conv/bn`, classifier `head.fc.*`, the reference's
    `resnetv1d101_mmcv.pth`) and our own names. A torchvision ResNet has a
    single 7x7 `conv1`/`bn1` stem with no counterpart in the deep stem: it is
    left as is, so the strict loader reports `conv1.*`/`bn1.*` as unexpected
    and `stem_layer.*` as missing instead of loading the blocks alone.
    """
    return {_mmcls_stem_key(k): v for k, v in imagenet_resnet_keys(state_dict).items()}


def build(cfg: DeepLabV3PlusCfg, num_classes: int, pretrained: bool = True) -> DeepLabV3Plus:
    """The network of `cfg`; `pretrained=False` skips the ImageNet file (a checkpoint follows)."""
    b, d = cfg.backbone, cfg.decoder
    backbone = ResNet(depth=b.depth, output_stride=b.output_stride, stem="deep", avg_down=True,
                      multi_grid=b.multi_grid, contract_dilation=b.contract_dilation, norm_layer=b.norm_layer,
                      dilate=True, conv_init="fan_in", zero_init_last=True)
    net = DeepLabV3Plus(backbone, num_classes, aspp_channels=d.aspp_channels, aspp_dilations=d.aspp_dilations,
                        low_level_channels=d.low_level_channels, dropout=d.dropout, norm_layer=d.norm_layer,
                        align_corners=cfg.align_corners)
    if pretrained and b.pretrained:
        load_pretrained(net.backbone, b.pretrained, checkpoint_filter_fn, "model.backbone.pretrained")
    return net

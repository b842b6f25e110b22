"""SegFormer: the MiT encoder, the reference's all-MLP head and a 1x1
classifier (spec segmenters-and-coco.md §5).

The reference's class cannot be built (QUIRK-S10); this builds what it intended.
Names are the reference's (`backbone.*` = NVlabs' MiT names, `decoder.linear_c*`,
`decoder.linear_fuse.*`, `classifier.*`: 348 state-dict entries for B2). NOTE
(kept, not a defect): the head fuses 4 x 768 channels to 256 and the classifier
reads those 256, where NVlabs' B2 fuses to 768. The values live in
`configs/model/segformer.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import StateDict, drop_keys_with_prefix, load_pretrained
from .mit import MixVisionTransformer
from .resnet import NormName, init_conv_and_norm, make_norm_layer


@dataclass
class BackboneCfg:
    variety: Literal["b0", "b1", "b2", "b3", "b4", "b5"]
    drop_path_rate: float           # stochastic depth, linear from 0 over all blocks
    pretrained: Optional[str]       # NVlabs ImageNet file (mit_b2.pth); null trains from scratch


@dataclass
class DecoderCfg:
    embed_dim: int                  # width of each stage's linear projection
    channels: int                   # width after the fuse conv, read by the classifier
    dropout: float                  # channel dropout (Dropout2d) before the classifier
    norm_layer: NormName


@dataclass
class SegFormerCfg:
    name: Literal["segformer"]
    align_corners: bool
    backbone: BackboneCfg
    decoder: DecoderCfg


class LinearEmbed(nn.Module):
    """A per-pixel Linear on a B x C x h x w map (the head's `linear_c{i}.proj`)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class SegFormerHead(nn.Module):
    """Each stage projected to `embed_dim`, upsampled to stride 4, concatenated
    deepest first ([c4, c3, c2, c1]), fused by a 1x1 conv + norm + ReLU, then
    channel dropout."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int, channels: int, dropout: float, norm_layer: str,
                 align_corners: bool) -> None:
        super().__init__()
        self.align_corners = align_corners
        for i, c in enumerate(in_channels, start=1):
            self.add_module(f"linear_c{i}", LinearEmbed(c, embed_dim))
        norm = make_norm_layer(norm_layer)
        self.linear_fuse = nn.Sequential(nn.Conv2d(len(in_channels) * embed_dim, channels, 1, bias=False),
                                         norm(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        # The reference's init_weight: Kaiming convs, norms 1/0; the Linears keep PyTorch's init.
        init_conv_and_norm(self)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        maps = []
        for i in reversed(range(len(feats))):
            x = getattr(self, f"linear_c{i + 1}")(feats[i])
            if i > 0:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
            maps.append(x)
        return self.dropout(self.linear_fuse(torch.cat(maps, dim=1)))


class SegFormer(nn.Module):
    """forward(x) returns `embeddings` (the head's output, stride 4), `pre_logits`
    (stride 4) and `logits` (bilinear to the input size)."""

    def __init__(self, backbone: MixVisionTransformer, num_classes: int, *, embed_dim: int, channels: int,
                 dropout: float, norm_layer: str, align_corners: bool) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.backbone = backbone
        self.decoder = SegFormerHead(backbone.out_channels, embed_dim, channels, dropout, norm_layer, align_corners)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_conv_and_norm(self.classifier)  # Kaiming weight; the bias keeps PyTorch's default draw

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        embeddings = self.decoder(self.backbone(x))
        pre_logits = self.classifier(embeddings)
        logits = F.interpolate(pre_logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return {"embeddings": embeddings, "pre_logits": pre_logits, "logits": logits}


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor]) -> StateDict:
    """NVlabs' ImageNet MiT file (`mit_b2.pth`) -> the encoder's names (spec §5.6,
    QUIRK-S7): its 1000-class `head.*` is dropped when present (the reference
    required it); every other key must already match."""
    return drop_keys_with_prefix(state_dict, "head.")


def build(cfg: SegFormerCfg, num_classes: int, pretrained: bool = True) -> SegFormer:
    """The network of `cfg`; `pretrained=False` skips the ImageNet file (a checkpoint follows)."""
    b, d = cfg.backbone, cfg.decoder
    backbone = MixVisionTransformer(b.variety, b.drop_path_rate)
    net = SegFormer(backbone, num_classes, embed_dim=d.embed_dim, channels=d.channels, dropout=d.dropout,
                    norm_layer=d.norm_layer, align_corners=cfg.align_corners)
    if pretrained and b.pretrained:
        load_pretrained(net.backbone, b.pretrained, checkpoint_filter_fn, "model.backbone.pretrained")
    return net

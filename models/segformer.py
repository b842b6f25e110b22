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

import re
from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import StateDict, drop_keys_with_prefix, key_listing, load_pretrained, strip_prefix
from .mit import MixVisionTransformer
from .resnet import NormName, init_conv_and_norm, make_norm_layer


@dataclass
class BackboneCfg:
    variety: Literal["b0", "b1", "b2", "b3", "b4", "b5"]
    drop_path_rate: float           # stochastic depth, linear from 0 over all blocks
    pretrained: Optional[str]       # ImageNet MiT file, NVlabs' (mit_b2.pth) or Hugging Face's; null: from scratch


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


def nvlabs_filter_fn(state_dict: Mapping[str, Tensor]) -> StateDict:
    """NVlabs' ImageNet MiT file (`mit_b2.pth`) -> the encoder's names (spec §5.6,
    QUIRK-S7): its 1000-class `head.*` is dropped when present (the reference
    required it); every other key must already match."""
    return drop_keys_with_prefix(state_dict, "head.")


# Hugging Face's Segformer names (the `nvidia/mit-b*` files, and what transformers' save_pretrained
# writes) -> ours, after the `segformer.` prefix is gone. Stage and block indices count from 0
# there and from 1 here. `key` and `value` are absent: they are fused into `attn.kv` below.
_HF_STAGE = re.compile(r"encoder\.(patch_embeddings|layer_norm)\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(\d+)\.(.+)")
_HF_KEY_VALUE = re.compile(r"encoder\.block\.(\d+)\.(\d+)\.attention\.self\.(key|value)\.(weight|bias)")
_HF_PATCH_EMBED = {"proj": "proj", "layer_norm": "norm"}
_HF_IN_BLOCK = {
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}
_HF_HEADS = ("classifier.", "decode_head.")  # ImageNet classifier / ADE20K-Cityscapes head


def is_hf_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """The layout rule: a file is Hugging Face's when any key starts with `encoder.` or
    `segformer.encoder.` (no NVlabs or encoder name of ours does); otherwise it is NVlabs'."""
    return any(k.startswith(("encoder.", "segformer.encoder.")) for k in state_dict)


def _hf_name(name: str) -> Optional[str]:
    """Our name for one Hugging Face encoder key, None when it is not one (key/value excluded)."""
    found = _HF_STAGE.fullmatch(name)
    if found:
        kind, stage, rest = found.groups()
        if kind == "layer_norm":
            return f"norm{int(stage) + 1}.{rest}" if rest in ("weight", "bias") else None
        module, _, param = rest.rpartition(".")
        return f"patch_embed{int(stage) + 1}.{_HF_PATCH_EMBED[module]}.{param}" if module in _HF_PATCH_EMBED else None
    found = _HF_BLOCK.fullmatch(name)
    if found:
        stage, block, rest = found.groups()
        module, _, param = rest.rpartition(".")
        if module in _HF_IN_BLOCK:
            return f"block{int(stage) + 1}.{block}.{_HF_IN_BLOCK[module]}.{param}"
    return None


def hf_filter_fn(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face's MiT / Segformer file (`nvidia/mit-b*`: `pytorch_model.bin` or
    `model.safetensors`) -> the encoder's names. The `segformer.` prefix is optional, the
    `classifier.*` / `decode_head.*` heads are dropped, and each block's separate `key` and
    `value` Linears are stacked into our fused `kv` (keys first, the order `Attention` splits
    them in); every other tensor keeps its shape. A key that is no Hugging Face encoder name
    (e.g. an NVlabs key in the same file) is an error listing them: mixed files never load."""
    state_dict = drop_keys_with_prefix(strip_prefix(state_dict, "segformer."), *_HF_HEADS)
    out: StateDict = {}
    halves: Dict[str, Dict[str, Tensor]] = {}
    unknown = []
    for name, tensor in state_dict.items():
        found = _HF_KEY_VALUE.fullmatch(name)
        if found:
            stage, block, half, param = found.groups()
            halves.setdefault(f"block{int(stage) + 1}.{block}.attn.kv.{param}", {})[half] = tensor
            continue
        ours = _hf_name(name)
        if ours is None:
            unknown.append(name)
        else:
            out[ours] = tensor
    if unknown:
        raise ValueError(f"Hugging Face MiT layout (keys start with 'encoder.' or 'segformer.encoder.') but "
                         f"these keys are not Hugging Face MiT encoder names: {key_listing(unknown)}")
    halfway = [f"{ours} ({'/'.join(sorted(parts))} only)" for ours, parts in halves.items() if len(parts) != 2]
    if halfway:
        raise ValueError(f"Hugging Face MiT layout: attention key and value come in pairs, but these have one: "
                         f"{key_listing(halfway)}")
    return {**out, **{ours: torch.cat([parts["key"], parts["value"]], dim=0) for ours, parts in halves.items()}}


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Either MiT file layout -> the encoder's names: Hugging Face's when `is_hf_layout`,
    NVlabs' otherwise, so `model.backbone.pretrained` takes either file as downloaded."""
    return hf_filter_fn(state_dict) if is_hf_layout(state_dict) else nvlabs_filter_fn(state_dict)


def build(cfg: SegFormerCfg, num_classes: int, pretrained: bool = True) -> SegFormer:
    """The network of `cfg`; `pretrained=False` skips the ImageNet file (a checkpoint follows)."""
    b, d = cfg.backbone, cfg.decoder
    backbone = MixVisionTransformer(b.variety, b.drop_path_rate)
    net = SegFormer(backbone, num_classes, embed_dim=d.embed_dim, channels=d.channels, dropout=d.dropout,
                    norm_layer=d.norm_layer, align_corners=cfg.align_corners)
    if pretrained and b.pretrained:
        load_pretrained(net.backbone, b.pretrained, checkpoint_filter_fn, "model.backbone.pretrained")
    return net

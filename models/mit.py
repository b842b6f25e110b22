"""Mix Transformer (MiT) encoder of SegFormer, varieties b0-b5
(spec segmenters-and-coco.md §5.1, QUIRK-S11: every variety builds).

Parameter names are NVlabs' (`patch_embed{i}.*`, `block{i}.{j}.*`,
`norm{i}.*`), so their ImageNet files (`mit_b2.pth`) load after dropping the
classifier `head.*`. Our own DropPath stands in for timm's; its masks come from
the torch RNG, so `--determ` runs stay bit-identical.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn


class Variety(NamedTuple):
    dims: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]


# The architecture table of the reference's mit_b0..mit_b5 classes; heads, sr ratios, the MLP
# ratio, the patch-embed kernels and the norms' eps are the same for every variety.
VARIETIES: Dict[str, Variety] = {
    "b0": Variety((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": Variety((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": Variety((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": Variety((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": Variety((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": Variety((64, 128, 320, 512), (3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
PATCH_KERNELS = (7, 3, 3, 3)
PATCH_STRIDES = (4, 2, 2, 2)
BLOCK_NORM_EPS = 1e-6   # LN1, LN2 of every block and the stage norms norm1..norm4
EMBED_NORM_EPS = 1e-5   # the patch embeds' and the spatial reduction's LayerNorm (PyTorch's default)


class DropPath(nn.Module):
    """Stochastic depth per sample: a residual branch is zeroed for a random
    subset of the batch and the rest scaled by 1/keep (timm's defaults)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (padding k // 2), flattened to tokens, LayerNorm."""

    def __init__(self, kernel: int, stride: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Multi-head self-attention whose keys and values come from a spatially
    reduced copy of the tokens (a k = s = sr conv + LayerNorm) when sr > 1."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            reduced = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(reduced)
        k, v = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T * scale) v in one fused kernel (no attention matrix kept for backward).
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depthwise conv over the token grid (the Mix-FFN's positional cue)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def drop_path_rates(depths: Sequence[int], rate: float) -> List[List[float]]:
    """Stochastic-depth rate of every block, linear from 0 to `rate` over all blocks in stage order."""
    total = sum(depths)
    flat = [rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


def _init_weights(m: nn.Module) -> None:
    """The reference's per-module init: Linear trunc-normal(0.02) / zero bias,
    LayerNorm 1 / 0, Conv2d normal(0, sqrt(2 / fan_out)) / zero bias."""
    if isinstance(m, nn.Linear):
        # timm truncates at +-2 absolute, i.e. 100 std: effectively untruncated.
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MixVisionTransformer(nn.Module):
    """MiT encoder: four stages of overlapping patch embed, blocks and LayerNorm.

    forward(x) returns the four stage maps (B x dims[i] x H_i x W_i at strides
    4, 8, 16, 32; odd sizes round up by the conv arithmetic). `out_channels`
    lists the stage widths for the decoder.
    """

    def __init__(self, variety: str, drop_path_rate: float, in_channels: int = 3) -> None:
        super().__init__()
        if variety not in VARIETIES:
            raise ValueError(f"unknown MiT variety {variety!r}; expected one of {sorted(VARIETIES)}")
        dims, depths = VARIETIES[variety]
        self.out_channels = list(dims)
        rates = drop_path_rates(depths, drop_path_rate)
        previous = in_channels
        for i in range(4):
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(PATCH_KERNELS[i], PATCH_STRIDES[i], previous,
                                                                    dims[i]))
            previous = dims[i]
        for i in range(4):
            self.add_module(f"block{i + 1}", nn.ModuleList(
                Block(dims[i], NUM_HEADS[i], SR_RATIOS[i], rates[i][j]) for j in range(depths[i])))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dims[i], eps=BLOCK_NORM_EPS))
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()
            feats.append(x)
        return feats


"""One ResNet family for both stages, returning its stage features (spec
second-stage.md §3, segmenters-and-coco.md §4.1; the first stage's spec §5).

Variants by constructor arguments, as timm does:

* ResNetV1d ("ResNet-D", DeepLabV3+): `stem="deep"` (three 3x3 convs instead of
  one 7x7) and `avg_down=True` (strided shortcuts average-pool before a stride-1
  1x1 conv instead of using a strided 1x1 conv, which would throw away three
  quarters of the input);
* the reference's "ResNet-B" (DeepLabV2): `stem="plain"` (torchvision's 7x7
  conv, named `stem_layer.conv1/bn1`) and `avg_down=False` (torchvision's
  strided 1x1 shortcut), i.e. torchvision's V1.5 bottleneck network.
* IRN's ResNet (the first stage's backbone): the plain stem and shortcut, output
  stride 16 by dropping layer4's stride without dilating it (`dilate=False`),
  torchvision's initialisation (`conv_init="fan_out"`, `zero_init_last=False`)
  and BN that keeps its ImageNet statistics (`norm_layer="FixedBN"`).

Parameter names are `stem_layer.*` and `layer1..layer4.*`; each user's
checkpoint filter maps foreign ImageNet files onto them (`plain_stem_filter`
for torchvision's names).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Literal, Mapping, Optional, Sequence, Type, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import StateDict, drop_keys_with_prefix, strip_prefix

NormLayer = Callable[[int], nn.Module]
# The norm layers a config may name (GroupNorm needs a group count, so only code builds it;
# under DDP on GPUs, BN is converted to SyncBN anyway).
NormName = Literal["BN", "SyncBN"]

# Standard block counts per stage. (The reference table has [3, 4, 36, 3] for
# 152 and a "32" entry; these are the published ResNet tables.)
STAGE_BLOCKS: Dict[int, List[int]] = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}

# Per-stage stride and dilation for each supported output stride. A stage that
# is dilated instead of strided keeps the resolution of the stage before it.
STAGE_STRIDES: Dict[int, List[int]] = {8: [1, 2, 1, 1], 16: [1, 2, 2, 1]}
STAGE_DILATIONS: Dict[int, List[int]] = {8: [1, 1, 2, 4], 16: [1, 1, 1, 2]}

STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTHS = (32, 32, 64)

_NORM_ALIASES = {
    "BN": "BN",
    "BatchNorm2d": "BN",
    "FixedBN": "FixedBN",
    "FixedBatchNorm2d": "FixedBN",
    "SyncBN": "SyncBN",
    "SyncBatchNorm": "SyncBN",
    "GN": "GN",
    "GroupNorm": "GN",
}
_NORM_OPTIONS = {"BN": {"eps", "momentum"}, "FixedBN": {"eps"}, "SyncBN": {"eps", "momentum"},
                 "GN": {"num_groups", "eps"}}


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its stored statistics and never updates them,
    in train mode too (IRN's backbone keeps its ImageNet statistics; batches of a few crops
    would spoil them). Weight and bias stay trainable; the names are BatchNorm2d's."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def make_norm_layer(cfg: Union[str, Mapping, NormLayer, None]) -> NormLayer:
    """Turn a norm config into a factory `norm_layer(num_channels) -> nn.Module`.

    Accepts "BN" / "FixedBN" / "SyncBN" / "GN" (or the class names "BatchNorm2d",
    "FixedBatchNorm2d", "SyncBatchNorm", "GroupNorm", which the reference's configs use), a dict
    such as {"type": "GN", "num_groups": 32}, or an already-built callable.
    None means "BN".
    """
    if cfg is None:
        cfg = "BN"
    if callable(cfg) and not isinstance(cfg, (str, Mapping)):
        return cfg
    if isinstance(cfg, str):
        cfg = {"type": cfg}
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ValueError(f"norm_layer must be a name, a dict with 'type', or a callable; got {cfg!r}")
    kind = _NORM_ALIASES.get(cfg["type"])
    if kind is None:
        raise ValueError(f"unknown norm_layer type {cfg['type']!r}; expected one of {sorted(_NORM_ALIASES)}")
    options = {k: v for k, v in cfg.items() if k != "type"}
    unknown = set(options) - _NORM_OPTIONS[kind]
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} for norm_layer type {cfg['type']!r}")

    if kind == "BN":
        return lambda channels: nn.BatchNorm2d(channels, **options)
    if kind == "FixedBN":
        return lambda channels: FixedBatchNorm2d(channels, **options)
    if kind == "SyncBN":
        return lambda channels: nn.SyncBatchNorm(channels, **options)
    if "num_groups" not in options:
        raise ValueError("norm_layer type 'GN' needs 'num_groups'")
    num_groups = options.pop("num_groups")
    return lambda channels: nn.GroupNorm(num_groups, channels, **options)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size (up to the stride) for any dilation
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class DeepStem(nn.Module):
    """Three 3x3 conv-BN-ReLU (the first strided) then a strided 3x3 max-pool."""

    def __init__(self, norm_layer: NormLayer, in_channels: int = 3) -> None:
        super().__init__()
        w1, w2, w3 = STEM_WIDTHS
        self.conv1 = _conv3x3(in_channels, w1, stride=2)
        self.bn1 = norm_layer(w1)
        self.conv2 = _conv3x3(w1, w2)
        self.bn2 = norm_layer(w2)
        self.conv3 = _conv3x3(w2, w3)
        self.bn3 = norm_layer(w3)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.out_channels = w3

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)


class PlainStem(nn.Module):
    """torchvision's stem: a strided 7x7 conv-BN-ReLU then a strided 3x3 max-pool."""

    def __init__(self, norm_layer: NormLayer, in_channels: int = 3) -> None:
        super().__init__()
        width = STAGE_WIDTHS[0]
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


STEMS: Dict[str, Callable[..., nn.Module]] = {"deep": DeepStem, "plain": PlainStem}


class BasicBlock(nn.Module):
    """Two 3x3 convs. Both are dilated, so a dilated stage sees the same
    receptive field as the strided network whose ImageNet weights it reuses."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        dilation: int,
        norm_layer: NormLayer,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv3x3(in_channels, width, stride, dilation)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, out_channels, 1, dilation)
        self.bn2 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (expansion 4); stride and dilation sit on the 3x3."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        dilation: int,
        norm_layer: NormLayer,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # Registered last so the state-dict order matches the reference's.
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def make_shortcut(
    in_channels: int, out_channels: int, stride: int, dilation: int, avg_down: bool, norm_layer: NormLayer
) -> nn.Sequential:
    """Projection shortcut for the first block of a stage.

    Without `avg_down` it is torchvision's strided 1x1 conv + norm (indices 0/1).
    With it (ResNet-D), the conv/norm of a strided or dilated stage sit at
    indices 1/2, so a stage that is dilated here but strided in the ImageNet
    model still loads the ImageNet shortcut weights.
    """
    if not avg_down:
        return nn.Sequential(_conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))
    if stride != 1:
        # ceil_mode lets odd sizes round up exactly like the strided 3x3 conv
        # beside it does; count_include_pad=False averages the overhanging
        # window over real pixels only. Even sizes are unaffected.
        pool = nn.AvgPool2d(stride, stride=stride, ceil_mode=True, count_include_pad=False)
        return nn.Sequential(pool, _conv1x1(in_channels, out_channels), norm_layer(out_channels))
    if dilation != 1:
        return nn.Sequential(nn.Identity(), _conv1x1(in_channels, out_channels), norm_layer(out_channels))
    return nn.Sequential(_conv1x1(in_channels, out_channels), norm_layer(out_channels))


def stage_dilations(
    num_blocks: int, dilation: int, multi_grid: Optional[Sequence[int]], contract_dilation: bool
) -> List[int]:
    """Dilation of every block in one stage.

    Multi-grid multiplies the stage dilation by a per-block unit rate. Without
    multi-grid, `contract_dilation` halves the first block's dilation of a
    dilated stage (it still sees the pre-dilation resolution's neighbourhood);
    with multi-grid it has no effect on that stage, as in the reference.
    """
    if multi_grid:
        # A stage shorter than the rate list (layer4 of depth 18) uses the
        # leading rates, as the reference does; a longer one has no rate to use.
        if len(multi_grid) < num_blocks:
            raise ValueError(f"multi_grid {list(multi_grid)} has fewer rates than the stage's {num_blocks} blocks")
        return [rate * dilation for rate in multi_grid[:num_blocks]]
    first = dilation // 2 if contract_dilation and dilation > 1 else dilation
    return [first] + [dilation] * (num_blocks - 1)


class ResNet(nn.Module):
    """Dilated ResNet returning its stage features `layer1`..`layer4`.

    Every argument but `in_channels` is required: the values live in the
    segmenter's YAML or its builder, not here.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
        output_stride: 8 or 16; the deepest stages are not strided.
        dilate: dilate the stages that lose their stride (DeepLab), so they keep
            the receptive field; False leaves them at dilation 1 (IRN's layer4).
        stem: "deep" (ResNet-D, three 3x3 convs) or "plain" (torchvision's 7x7).
        avg_down: average-pool strided shortcuts (ResNet-D) instead of a strided 1x1 conv.
        multi_grid: unit rates for the blocks of layer4, multiplied by that
            stage's dilation (the first len(layer4) rates are used); None or
            empty disables multi-grid.
        contract_dilation: halve the first block's dilation in dilated stages
            that do not use multi-grid. Off, every block of a dilated stage, the
            first included, has the stage's dilation (both reference backbones).
        norm_layer: anything `make_norm_layer` accepts.
        conv_init: Kaiming-normal mode of every conv, "fan_in" (the segmenters'
            reference) or "fan_out" (torchvision's, IRN's).
        zero_init_last: zero the last norm of every residual branch, so each
            block starts as the identity (Goyal et al., 2017).
        in_channels: image channels.
    """

    def __init__(
        self,
        *,
        depth: int,
        output_stride: int,
        stem: Literal["deep", "plain"],
        avg_down: bool,
        multi_grid: Optional[Sequence[int]],
        contract_dilation: bool,
        norm_layer: Union[str, Mapping, NormLayer, None],
        dilate: bool,
        conv_init: Literal["fan_in", "fan_out"],
        zero_init_last: bool,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"unsupported depth {depth}; expected one of {sorted(STAGE_BLOCKS)}")
        if output_stride not in STAGE_STRIDES:
            raise ValueError(f"unsupported output_stride {output_stride}; expected one of {sorted(STAGE_STRIDES)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {sorted(STEMS)}")
        if conv_init not in ("fan_in", "fan_out"):
            raise ValueError(f"unknown conv_init {conv_init!r}; expected 'fan_in' or 'fan_out'")
        norm = make_norm_layer(norm_layer)
        block: Block = BasicBlock if depth < 50 else Bottleneck
        self.depth = depth
        self.output_stride = output_stride

        self.stem_layer = STEMS[stem](norm, in_channels)
        channels = self.stem_layer.out_channels
        self.out_channels: Dict[str, int] = {}
        dilations = STAGE_DILATIONS[output_stride] if dilate else [1, 1, 1, 1]
        stages = zip(STAGE_BLOCKS[depth], STAGE_WIDTHS, STAGE_STRIDES[output_stride], dilations)
        for index, (num_blocks, width, stride, dilation) in enumerate(stages, start=1):
            grid = multi_grid if index == 4 else None
            layer = self._make_stage(block, channels, width, num_blocks, stride, dilation, grid, contract_dilation,
                                     avg_down, norm)
            self.add_module(f"layer{index}", layer)
            channels = width * block.expansion
            self.out_channels[f"layer{index}"] = channels

        self.init_weights(conv_init, zero_init_last)

    @staticmethod
    def _make_stage(
        block: Block,
        in_channels: int,
        width: int,
        num_blocks: int,
        stride: int,
        dilation: int,
        multi_grid: Optional[Sequence[int]],
        contract_dilation: bool,
        avg_down: bool,
        norm: NormLayer,
    ) -> nn.Sequential:
        if dilation != 1:
            stride = 1
        dilations = stage_dilations(num_blocks, dilation, multi_grid, contract_dilation)
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            # Built before the block so that default-init random draws happen
            # in the same order as in the reference.
            downsample = make_shortcut(in_channels, out_channels, stride, dilation, avg_down, norm)
        blocks = [block(in_channels, width, stride, dilations[0], norm, downsample)]
        for d in dilations[1:]:
            blocks.append(block(out_channels, width, 1, d, norm))
        return nn.Sequential(*blocks)

    def init_weights(self, conv_init: Literal["fan_in", "fan_out"], zero_init_last: bool) -> None:
        """Kaiming-normal (`conv_init`, ReLU) convs, norms to identity, then, if
        `zero_init_last`, zero the last norm of each residual branch."""
        init_conv_and_norm(self, conv_init)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm.weight)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats: Dict[str, Tensor] = {}
        x = self.stem_layer(x)
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            feats[f"layer{index}"] = x
        return feats


def irn_resnet(depth: int, norm_layer: Union[str, Mapping, NormLayer, None]) -> ResNet:
    """IRN's ResNet, the first stage's backbone (its spec §5): torchvision's network (plain
    7x7 stem, stride on the bottleneck's 3x3, strided 1x1 shortcuts, torchvision's
    initialisation) with layer4 neither strided nor dilated -> output stride 16. The first
    stage's norm is "FixedBN" (the reference) or "BN"; torchvision's ImageNet files load
    through `plain_stem_filter`."""
    return ResNet(depth=depth, output_stride=16, stem="plain", avg_down=False, multi_grid=None,
                  contract_dilation=False, norm_layer=norm_layer, dilate=False, conv_init="fan_out",
                  zero_init_last=False)


def imagenet_resnet_keys(state_dict: Mapping[str, Tensor]) -> StateDict:
    """The part of a ResNet ImageNet checkpoint's renaming that every variant shares:
    mmcls's `backbone.` prefix stripped, the classifier (`fc.*`, mmcls `head.fc.*`)
    dropped. Block names (`layerN.M.convK/bnK/downsample.*`) already agree with
    ours; each segmenter's filter renames its own stem."""
    return strip_prefix(drop_keys_with_prefix(state_dict, "fc.", "head.fc."), "backbone.")


_TORCHVISION_STEM = ("conv1.", "bn1.")


def plain_stem_key(key: str) -> str:
    """torchvision's top-level stem name (`conv1.*`, `bn1.*`) -> ours (`stem_layer.conv1.*`);
    every other name (the blocks' `layerN.M.conv1` too) unchanged."""
    return f"stem_layer.{key}" if key.startswith(_TORCHVISION_STEM) else key


def plain_stem_filter(state_dict: Mapping[str, Tensor]) -> StateDict:
    """ImageNet ResNet weights -> a plain-stem ResNet's names: torchvision's files (V1
    `resnet50-19c8e357.pth`, V2 `resnet101-cd907fc2.pth`: flat, stem `conv1`/`bn1`,
    classifier `fc.*`), mmcls-style files (`backbone.` prefix, `head.fc.*`, wrapped in
    `state_dict` or not) and our own names (`stem_layer.conv1`, ...)."""
    return {plain_stem_key(k): v for k, v in imagenet_resnet_keys(state_dict).items()}


_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)


def init_conv_and_norm(module: nn.Module, conv_init: Literal["fan_in", "fan_out"] = "fan_in") -> None:
    """Reference initialisation: Kaiming-normal (`conv_init`, ReLU) conv weights
    (conv biases keep PyTorch's default draw), norm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode=conv_init, nonlinearity="relu")
        elif isinstance(m, _NORM_TYPES) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

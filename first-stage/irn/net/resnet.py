"""ResNet backbone of the first stage (spec §5).

torchvision layout and parameter names (``conv1, bn1, layer1..layer4``) so the
torchvision ImageNet file loads strictly (minus ``fc.*``). Differences from a
classification ResNet, all needed to reproduce IRN:

* stage strides (2, 2, 2, 1): layer4 keeps stride 1 without dilation -> output stride 16;
* every BatchNorm is *fixed*: it always normalises with the stored running statistics and
  never updates them, whatever the train/eval flag (the affine scale/shift stay parameters);
* no average pool / fc head.

Depth 50 uses bottleneck blocks [3, 4, 6, 3] (the reference); 18/34 use basic blocks so CPU
runs stay affordable. ``out_channels`` tells the heads how wide each stage is.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import MissingInputError, WeightsError


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always uses (and never updates) its running statistics.

    ``fixed = False`` turns it back into an ordinary BatchNorm (batch statistics in train
    mode). Not the reference: only for training from scratch, where normalising with the
    untrained statistics (mean 0, var 1) leaves the network unable to learn (see
    ``build_backbone(bn_mode=...)``).
    """

    fixed: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fixed:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


BN_MODES = ("fixed", "batch")


def set_bn_mode(model: nn.Module, mode: str) -> nn.Module:
    """``fixed`` (reference, §5) or ``batch`` (ordinary BN: batch statistics while training)."""
    if mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, FixedBatchNorm2d):
            m.fixed = mode == "fixed"
    return model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), FixedBatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = FixedBatchNorm2d(width)
        self.conv2 = _conv3x3(width, cout)
        self.bn2 = FixedBatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # torchvision rule: project whenever the shape changes (stride or channels).
        self.downsample = _projection(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, kernel_size=1, bias=False)
        self.bn1 = FixedBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)  # torchvision (v1.5): stride on the 3x3 conv
        self.bn2 = FixedBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, kernel_size=1, bias=False)
        self.bn3 = FixedBatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block, blocks per stage)
ARCHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}
STAGE_STRIDES = (1, 2, 2, 1)  # layer1..layer4 (the stem conv and max-pool add 2 x 2)


class ResNet(nn.Module):
    """Stem + four stages; ``forward`` returns the layer4 features (output stride 16)."""

    def __init__(self, depth: int = 50):
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"backbone depth must be one of {sorted(ARCHS)}, got {depth}")
        block, counts = ARCHS[depth]
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FixedBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        self.out_channels: dict[str, int] = {"conv1": 64}
        for i, (width, n, stride) in enumerate(zip((64, 128, 256, 512), counts, STAGE_STRIDES), start=1):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, stride if j == 0 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.out_channels[f"layer{i}"] = cin
        # Same initialisation as torchvision, so "from scratch" runs start like a fresh torchvision model.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 + bn1 + relu + max-pool (stride 4, 64 channels)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_torchvision_weights(model: ResNet, path: str | Path) -> None:
    """Load a torchvision ImageNet ResNet file: every key except ``fc.*`` must match exactly.

    ``num_batches_tracked`` may be absent (the original 2017 files lack it); it is unused
    because the BatchNorm is fixed.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--backbone_weights: backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not match a torchvision ResNet-{model.depth}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def build_backbone(depth: int = 50, weights: str | Path | None = None, bn_mode: str = "fixed") -> ResNet:
    """The §5 backbone; ``weights`` = path of a torchvision ImageNet file, None = random init.

    ``bn_mode="batch"`` is a from-scratch aid (ordinary BatchNorm), not the reference.
    """
    model = set_bn_mode(ResNet(depth), bn_mode)
    if weights is None or str(weights) == "":
        warnings.warn(
            "\n" + "!" * 78 + f"\n!! NO IMAGENET WEIGHTS for the ResNet-{depth} backbone: training from SCRATCH.\n"
            "!! Results will be far below the reference (fine for the synthetic demo, not for VOC).\n"
            "!! Pass --backbone_weights PATH (torchvision resnet file, e.g. resnet50-19c8e357.pth).\n"
            + "!" * 78, UserWarning, stacklevel=2)
    else:
        load_torchvision_weights(model, weights)
    return model


__all__ = ["FixedBatchNorm2d", "BN_MODES", "set_bn_mode", "BasicBlock", "Bottleneck", "ResNet", "build_backbone", "load_torchvision_weights"]

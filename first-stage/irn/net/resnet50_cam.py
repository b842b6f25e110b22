"""CAM network (spec §6.1 training form, §7.1 inference form).

Named after the reference module; the backbone depth is a parameter (50 = reference,
18/34 for CPU runs), the classifier width follows the backbone's layer4 channels and the
class count ``n_classes`` is the data set's (the steps pass ``DataSource.num_classes``:
VOC 20, COCO 80; the default is VOC's, from its class table).

QUIRK-17 (COCO): the reference's COCO steps call a CAM network with ``n_classes`` that this
repository's module lacked; the ReCAM code base they probably ran in does not cut gradients
after layer2. Our choice: COCO uses this (VOC/IRN) network with 80 classes and the default
``freeze_until="stage2"``; ``--cam_freeze_until stem`` gives the ReCAM-style trainable layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.prepare.cls_labels import FG_CLASSES
from models.checkpoint import load_pretrained
from models.resnet import ResNet
from irn.net.backbone import build_backbone, checkpoint_filter_fn

# Former constant, kept importable: VOC's class count (the default of ``n_classes``).
NUM_CLASSES = len(FG_CLASSES)


class Net(nn.Module):
    """Training form: stem+layer1 → layer2 → (gradient cut) → layer3 → layer4 → GAP → 1×1 conv.

    ``freeze_until`` (QUIRK-17's option): "stage2" (reference VOC/IRN) cuts gradients after
    layer2 and marks the stem's conv1/bn1 frozen, so only layer3/layer4 and the classifier
    learn; "stem" (the ReCAM variant) freezes only conv1/bn1; "none" trains everything (useful
    when training from scratch, where frozen random layers limit the CAMs).
    """

    FREEZE_CHOICES = ("stage2", "stem", "none")

    def __init__(self, depth: int = 50, weights: str | Path | None = None, n_classes: int = NUM_CLASSES,
                 backbone: ResNet | None = None, freeze_until: str = "stage2", bn_mode: str = "fixed",
                 num_classes: int | None = None):
        super().__init__()
        if num_classes is not None:  # former keyword
            n_classes = num_classes
        if int(n_classes) < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        n_classes = int(n_classes)
        if freeze_until not in self.FREEZE_CHOICES:
            raise ValueError(f"freeze_until must be one of {self.FREEZE_CHOICES}, got {freeze_until!r}")
        self.freeze_until = freeze_until
        self.backbone = backbone if backbone is not None else build_backbone(depth, weights, bn_mode)
        self.num_classes = self.n_classes = n_classes
        feat = self.backbone.out_channels["layer4"]
        # PyTorch's default conv init (Kaiming-uniform a=√5 → U(±1/√feat)), no bias.
        self.classifier = nn.Conv2d(feat, n_classes, kernel_size=1, bias=False)
        if freeze_until != "none":
            stem = self.backbone.stem_layer
            for p in list(stem.conv1.parameters()) + list(stem.bn1.parameters()):
                p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.layer1(b.stem_layer(x))
        x = b.layer2(x)
        if self.freeze_until == "stage2":
            x = x.detach()
        return b.layer4(b.layer3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        # GAP over every position, crop padding included (QUIRK-23 KEEP).
        f = f.mean(dim=(2, 3), keepdim=True)
        return self.classifier(f).flatten(1)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, classifier parameters) for the two optimiser groups (§6.3)."""
        return list(self.backbone.parameters()), list(self.classifier.parameters())


class CAM(Net):
    """Inference form: input the pair ``[x, fliplr(x)]``; returns ``A[0] + fliplr(A[1])``,
    ``A = ReLU(classifier(features))`` — shape (C, h16, w16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.dim() != 4 or x.shape[0] != 2:
            raise ValueError(f"CAM expects the (2, 3, h, w) pair [x, flip(x)], got {tuple(x.shape)}")
        a = F.relu(F.conv2d(self.features(x), self.classifier.weight))
        return a[0] + a[1].flip(-1)


def load_cam_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by train_cam (strict: a depth/class mismatch fails with the file named)."""
    load_pretrained(model, path, checkpoint_filter_fn, "cam_weights_name",
                    missing_hint="run the train_cam step first", counters_from_file=True)
    return model


__all__ = ["Net", "CAM", "load_cam_weights", "NUM_CLASSES"]

"""IRN: inter-pixel relation network on a frozen ResNet (spec §11.1, §11.3, §12.1).

Two light branches read the five backbone stages (all detached; the backbone never trains,
unless ``train_backbone``, a from-scratch aid that is not the reference):

* the boundary (edge) branch: 32 channels per stage at stride 4, concatenated, 1×1 conv → 1
  boundary logit per stride-4 pixel;
* the displacement branch: a small top-down decoder → 2 channels (dy, dx) per stride-4 pixel,
  in stride-4 pixel units, followed by the mean-shift calibration.

Input channels of every branch conv follow the backbone's stem and stage widths (ResNet-50: 64,
256, 512, 1024, 2048; ResNet-18/34: 64, 64, 128, 256, 512); the branch widths (32 / 64, 128, 256)
are the reference's for every depth, so only the first conv of each block changes size.

Forms: ``Net`` (plain forward → logits, displacement), ``AffinityDisplacementLoss`` (training:
the four-part loss of §11.3 as sums and counts) and ``EdgeDisplacement`` (inference on the
``[x, flip(x)]`` pair, §12.1).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.affinity import PathIndex, edge_to_affinity
from models.checkpoint import load_pretrained
from models.resnet import ResNet
from irn.net.backbone import build_backbone, checkpoint_filter_fn, resnet

# Part of the loss definition (§11.3): keeps the logs finite and the ratios defined.
LOG_EPS = 1e-5
COUNT_EPS = 1e-5



def _block(cin: int, cout: int, groups: int, upsample: int = 1) -> nn.Sequential:
    """1×1 conv (no bias) → GroupNorm → [bilinear ×upsample] → ReLU, the order of §11.1."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Top-left window of ``ref``'s spatial size (upsampled maps are never smaller)."""
    return x[..., : ref.shape[-2], : ref.shape[-1]]


class MeanShift(nn.Module):
    """Identity in training mode; in eval mode subtracts the calibrated mean displacement.

    ``running_mean`` (2,) is set by train_irn's calibration pass (§11.4), never by backprop.
    """

    def __init__(self, channels: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class Net(nn.Module):
    """Frozen backbone + boundary and displacement branches; ``forward`` → (edge logits, displacement),
    both (B, ·, ceil(H/4), ceil(W/4))."""

    def __init__(self, depth: int = 50, weights: str | Path | None = None, backbone: ResNet | None = None,
                 train_backbone: bool = False):
        super().__init__()
        self.backbone = backbone if backbone is not None else build_backbone(depth, weights)
        # The reference freezes the backbone (§11.1). train_backbone is an option for runs without
        # ImageNet weights: the affinity loss then shapes the backbone's features too. (On the
        # synthetic demo data it did not improve the boundary maps; see docs/first-stage.md, "Without ImageNet weights: the demo's settings".)
        self.train_backbone = train_backbone
        for p in self.backbone.parameters():
            p.requires_grad_(train_backbone)
        ch = self.backbone.out_channels
        c1 = self.backbone.stem_layer.out_channels
        c2, c3, c4, c5 = ch["layer1"], ch["layer2"], ch["layer3"], ch["layer4"]
        # Boundary branch (32 channels per stage, all brought to stride 4).
        self.edge1 = _block(c1, 32, 4)
        self.edge2 = _block(c2, 32, 4)
        self.edge3 = _block(c3, 32, 4, upsample=2)
        self.edge4 = _block(c4, 32, 4, upsample=4)
        self.edge5 = _block(c5, 32, 4, upsample=4)
        self.edge6 = nn.Conv2d(32 * 5, 1, 1, bias=True)
        # Displacement branch: stride-8 fusion of stages 3–5, then stride-4 fusion with 1–2.
        self.disp1 = _block(c1, 64, 8)
        self.disp2 = _block(c2, 128, 16)
        self.disp3 = _block(c3, 256, 16)
        self.disp4 = _block(c4, 256, 16, upsample=2)
        self.disp5 = _block(c5, 256, 16, upsample=2)
        self.disp6 = _block(256 * 3, 256, 16, upsample=2)
        self.disp7 = nn.Sequential(nn.Conv2d(64 + 128 + 256, 256, 1, bias=False), nn.GroupNorm(16, 256),
                                   nn.ReLU(inplace=True), nn.Conv2d(256, 2, 1, bias=False))
        self.mean_shift = MeanShift(2)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "Net":
        """Branches follow ``mode``; a frozen backbone stays in eval mode."""
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def edge_modules(self) -> list[nn.Module]:
        return [self.edge1, self.edge2, self.edge3, self.edge4, self.edge5, self.edge6]

    def displacement_modules(self) -> list[nn.Module]:
        return [self.disp1, self.disp2, self.disp3, self.disp4, self.disp5, self.disp6, self.disp7]

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(edge branch parameters, displacement branch parameters) — the two optimiser groups (§11.4).

        A trainable backbone joins the edge group (base lr): boundaries are what it must learn.
        """
        edge = [p for m in self.edge_modules() for p in m.parameters()]
        if self.train_backbone:
            edge += list(self.backbone.parameters())
        disp = [p for m in self.displacement_modules() for p in m.parameters()]
        return edge, disp

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The five backbone outputs x1..x5, detached as in §11.1 unless the backbone trains."""
        b = self.backbone
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            x1 = b.stem_layer(x)
            x2 = b.layer1(x1)
            x3 = b.layer2(x2)
            x4 = b.layer3(x3)
            x5 = b.layer4(x4)
        return x1, x2, x3, x4, x5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.edge_and_displacement(x)

    def edge_and_displacement(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge logits (B, 1, h4, w4), displacement (B, 2, h4, w4)); the subclasses' forwards wrap it."""
        x1, x2, x3, x4, x5 = self.stages(x)
        e2 = self.edge2(x2)
        edges = [self.edge1(x1), e2] + [_crop_to(m(f), e2) for m, f in
                                        ((self.edge3, x3), (self.edge4, x4), (self.edge5, x5))]
        edge = self.edge6(torch.cat(edges, dim=1))

        d1, d2, d3 = self.disp1(x1), self.disp2(x2), self.disp3(x3)
        d4 = _crop_to(self.disp4(x4), d3)
        d5 = _crop_to(self.disp5(x5), d3)
        d6 = _crop_to(self.disp6(torch.cat([d3, d4, d5], dim=1)), d2)
        disp = self.mean_shift(self.disp7(torch.cat([d1, d2, d6], dim=1)))
        return edge, disp


class AffinityDisplacementLoss(Net):
    """Training form: ``forward(x, bg_pos, fg_pos, neg)`` → per-term (sum, count) tensors.

    The loss terms of §11.3 are ratios over the whole batch, so forward returns numerators and
    denominators (``<term>_sum``, ``<term>_count``, each shape (1,)) that add up across
    DataParallel replicas; ``combine_losses`` forms the ratios and the total.
    """

    def __init__(self, path_index: PathIndex, depth: int = 50, weights: str | Path | None = None,
                 backbone: ResNet | None = None, train_backbone: bool = False):
        super().__init__(depth, weights, backbone, train_backbone)
        self.path_index = path_index
        # Target displacement of each direction, (1, 2, n_dirs, 1): δ(s, s+d) should equal d.
        target = torch.as_tensor(path_index.search_dst, dtype=torch.float32).t()
        self.register_buffer("disp_target", target[None, :, :, None].contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,  # type: ignore[override]
                neg: torch.Tensor) -> dict[str, torch.Tensor]:
        edge_logit, disp = self.edge_and_displacement(x)
        b, _, h, w = edge_logit.shape
        idx = self.path_index.indices((h, w), edge_logit.device)
        if bg_pos.shape[1:] != (self.path_index.n_dirs, idx.n_src):
            raise ValueError(f"affinity labels {tuple(bg_pos.shape)} do not fit the {h}x{w} output map "
                             f"({self.path_index.n_dirs} directions, {idx.n_src} sources): crop size mismatch?")
        aff = edge_to_affinity(torch.sigmoid(edge_logit), idx)  # (B, n_dirs, N_src)
        pos_term = -torch.log(aff + LOG_EPS)
        neg_term = -torch.log(1.0 + LOG_EPS - aff)

        flat = disp.reshape(b, 2, h * w)
        src = flat[:, :, idx.src].unsqueeze(2)  # (B, 2, 1, N_src)
        dst = flat[:, :, idx.dst.reshape(-1)].reshape(b, 2, *idx.dst.shape)
        delta = src - dst  # D(s) − D(t) for t = s + d
        fg_dp = (delta - self.disp_target).abs()
        bg_dp = delta.abs()

        def one(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(1)

        return {
            "bg_pos_sum": one((bg_pos * pos_term).sum()), "bg_pos_count": one(bg_pos.sum()),
            "fg_pos_sum": one((fg_pos * pos_term).sum()), "fg_pos_count": one(fg_pos.sum()),
            "neg_sum": one((neg * neg_term).sum()), "neg_count": one(neg.sum()),
            # Both channels are summed, hence the 2·count in the denominators (combine_losses).
            "disp_fg_sum": one((fg_pos.unsqueeze(1) * fg_dp).sum()), "disp_fg_count": one(fg_pos.sum()),
            "disp_bg_sum": one((bg_pos.unsqueeze(1) * bg_dp).sum()), "disp_bg_count": one(bg_pos.sum()),
        }


def combine_losses(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The §11.3 ratios and ``total = (L_pos + L_neg)/2 + (L_dfg + L_dbg)/2``.

    ``parts`` may hold one entry per replica (DataParallel gathers shape (n_gpus,)); they are summed.
    """
    s = {k: v.sum() for k, v in parts.items()}
    bg = s["bg_pos_sum"] / (s["bg_pos_count"] + COUNT_EPS)
    fg = s["fg_pos_sum"] / (s["fg_pos_count"] + COUNT_EPS)
    neg = s["neg_sum"] / (s["neg_count"] + COUNT_EPS)
    dfg = s["disp_fg_sum"] / (2 * s["disp_fg_count"] + COUNT_EPS)
    dbg = s["disp_bg_sum"] / (2 * s["disp_bg_count"] + COUNT_EPS)
    pos = bg / 2 + fg / 2
    total = (pos + neg) / 2 + (dfg + dbg) / 2
    return {"total": total, "pos": pos, "bg_pos": bg, "fg_pos": fg, "neg": neg, "disp_fg": dfg, "disp_bg": dbg}


class EdgeDisplacement(Net):
    """Inference form (§12.1): input the pair ``[x, fliplr(x)]`` (2, 3, H, W); returns the boundary
    map ``σ((E[0] + flip(E[1]))/2)`` (1, h4, w4) and the displacement ``D[0]`` (2, h4, w4).

    ``pad_to`` (QUIRK-11): None = run on the unpadded image (BECO); an int pads both images with
    zeros on the right/bottom to pad_to×pad_to first (IRN's behaviour; images must fit).
    """

    def __init__(self, depth: int = 50, backbone: ResNet | None = None, pad_to: int | None = None):
        super().__init__(depth, None, backbone if backbone is not None else resnet(depth))
        self.pad_to = pad_to

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if x.dim() != 4 or x.shape[0] != 2:
            raise ValueError(f"EdgeDisplacement expects the (2, 3, H, W) pair [x, flip(x)], got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        h4, w4 = (H - 1) // 4 + 1, (W - 1) // 4 + 1
        if self.pad_to is not None:
            if H > self.pad_to or W > self.pad_to:
                raise ValueError(f"image {H}x{W} is larger than irn_infer_pad_to={self.pad_to}")
            x = F.pad(x, (0, self.pad_to - W, 0, self.pad_to - H))
        edge_logit, disp = self.edge_and_displacement(x)
        # Crop before flipping back: the flipped image also sits in the top-left corner.
        edge_logit = edge_logit[..., :h4, :w4]
        disp = disp[..., :h4, :w4]
        edge = torch.sigmoid(edge_logit[0] / 2 + edge_logit[1].flip(-1) / 2)
        return edge, disp[0]


def load_irn_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load train_irn's state dict. Extra entries are ignored (the reference also stores path-index
    buffers); every parameter/buffer of ``model`` must be present and fit."""
    own = set(model.state_dict())

    def own_entries(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in checkpoint_filter_fn(state).items() if k in own}

    load_pretrained(model, path, own_entries, "irn_weights_name", missing_hint="run the train_irn step first",
                    counters_from_file=True)
    return model


__all__ = ["Net", "AffinityDisplacementLoss", "EdgeDisplacement", "MeanShift", "combine_losses",
           "load_irn_weights"]

"""Step train_irn (spec §11): boundary + displacement branches from the ir_label seeds.

Training: affinity samples of ``train_list`` (random scale 0.5–1.5, flip, random crop), the
four-part loss of §11.3, poly SGD with the edge branch at lr and the displacement branch at
10×lr (§11.4). Then the mean-shift calibration: the mean displacement over top-left crops of
``infer_list`` (eval mode, padding included, full batches only) becomes the network's
``mean_shift.running_mean``. The state dict is written atomically; an existing file is kept
unless ``--overwrite``. COCO: the affinity labels' validity bound is 81 and truncated JPEGs are
decoded as far as they go (the data source's reader).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from datasets.affinity import PathIndex
from datasets.transforms import TorchvisionNormalize
from datasets.views import AffinityView, ImageView, data_source, reduced_size
from irn.misc.runtime import (get_logger, progress, read_ids, resolve_device, save_torch, training_loader,
                              training_setup)
from models.checkpoint import load_pretrained
from irn.net import network_module
from irn.net.backbone import backbone_filter, file_state, resnet
from utils.runtime import seeded_loader_kwargs, set_seed

# IRN's data augmentation (§11.2); not a tuning knob of the reference.
IRN_SCALE_RANGE = (0.5, 1.5)


def irn_weights_path(args: Any) -> Path:
    return Path(args.irn_weights_name)


def ir_label_dir(args: Any) -> Path:
    return Path(args.ir_label_out_dir)


def irn_module(args: Any):
    return network_module(args.irn_network)


def load_backbone_from_cam(model: nn.Module, cam_weights: str | Path) -> None:
    """Copy the trained CAM network's backbone into IRN's (``--irn_backbone_from_cam``).

    Not the reference (IRN starts from ImageNet, §5). For runs without ImageNet weights it gives
    IRN's frozen backbone features learnt on the data instead of random ones.
    """
    load_pretrained(model.backbone, cam_weights, backbone_filter, "cam_weights_name",
                    missing_hint="run the train_cam step first", counters_from_file=True)


def _calibrate_mean_shift(model: nn.Module, args: Any, device: torch.device, show: bool) -> list[float]:
    """m = mean over full batches of the per-batch, per-channel mean displacement (§11.4)."""
    log = get_logger()
    ids = read_ids(args, "infer_list")
    dataset = ImageView(ids, data_source(args), img_normal=TorchvisionNormalize(),
                        crop_size=args.irn_crop_size, crop_method="top_left")
    drop_last = len(dataset) >= args.irn_batch_size
    if not drop_last:
        # The reference drops incomplete batches; with fewer images than one batch it would
        # average nothing (NaN), so use the one incomplete batch instead.
        log.warning(f"train_irn: {len(dataset)} infer_list images < batch {args.irn_batch_size}; "
                    "mean-shift calibration uses the incomplete batch")
    loader = DataLoader(dataset, batch_size=args.irn_batch_size, shuffle=False, drop_last=drop_last,
                        **seeded_loader_kwargs(args.seed, args.num_workers))
    model.eval()
    model.mean_shift.running_mean.zero_()  # calibrate the raw displacement (m still 0, as the reference)
    means = []
    with torch.no_grad():
        for batch in progress(loader, "train_irn mean-shift", total=len(loader), enabled=show, unit="batch"):
            _, disp = model.edge_and_displacement(batch["img"].to(device, non_blocking=True))
            means.append(disp.mean(dim=(0, 2, 3)))
    m = torch.stack(means).mean(dim=0)
    model.mean_shift.running_mean.copy_(m)
    return [float(v) for v in m]


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    out_path = irn_weights_path(args)
    if out_path.is_file() and not args.overwrite:
        log.info(f"train_irn: {out_path} exists, skipping (pass --overwrite to retrain)")
        return {"skipped": True, "weights": str(out_path)}
    set_seed(args.seed)
    device = resolve_device(args.device)
    show = not args.no_progress

    path_index = PathIndex(args.radius)
    ids = read_ids(args, "train_list")
    source = data_source(args)
    # Pairs with an id >= the label count (VOC 21, COCO 81: the 255 seeds) are unknown (§16.2).
    dataset = AffinityView(ids, ir_label_dir(args), args.irn_crop_size, source, path_index,
                           num_valid=source.num_labels, rescale=IRN_SCALE_RANGE, hor_flip=True,
                           crop_method="random")
    loader, max_step = training_loader(dataset, args.irn_batch_size, args.irn_num_epoches, args, device, "train_irn",
                                       "irn_batch_size")

    module = irn_module(args)
    from_cam = args.irn_backbone_from_cam
    train_backbone = args.irn_train_backbone
    if from_cam:
        model = module.AffinityDisplacementLoss(path_index, backbone=resnet(args.backbone_depth),
                                                train_backbone=train_backbone)
        load_backbone_from_cam(model, args.cam_weights_name)
        log.info(f"train_irn: backbone initialised from the CAM network {args.cam_weights_name}")
    else:
        model = module.AffinityDisplacementLoss(path_index, depth=args.backbone_depth, weights=args.backbone_weights,
                                                train_backbone=train_backbone)
    if train_backbone:
        log.info("train_irn: --irn_train_backbone: the backbone trains with the edge branch (not the reference)")
    optimizer, net = training_setup(model, args.irn_disp_lr_mult, args.irn_learning_rate, args.irn_weight_decay,
                                    max_step, args, device)

    log.info(f"train_irn: {len(dataset)} images, crop {args.irn_crop_size} (map {reduced_size(args.irn_crop_size)}), "
             f"radius {args.radius} ({path_index.n_dirs} directions), batch {args.irn_batch_size}, "
             f"{args.irn_num_epoches} epochs, max_step {max_step}, ResNet-{args.backbone_depth}, device {device}")
    start = time.perf_counter()
    history = []
    for epoch in range(args.irn_num_epoches):
        sums: dict[str, float] = {}
        count = 0
        bar = progress(loader, f"train_irn ep {epoch + 1}/{args.irn_num_epoches}", total=len(loader),
                       enabled=show, unit="batch")
        for batch in bar:
            parts = net(batch["img"].to(device, non_blocking=True),
                        batch["aff_bg_pos_label"].to(device, non_blocking=True),
                        batch["aff_fg_pos_label"].to(device, non_blocking=True),
                        batch["aff_neg_label"].to(device, non_blocking=True))
            losses = module.combine_losses(parts)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            if show and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(losses['total'].detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        record = {"epoch": epoch + 1, "step": optimizer.global_step, **{k: v / max(count, 1) for k, v in sums.items()}}
        history.append(record)
        log.info("train_irn: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()))

    mean_shift = _calibrate_mean_shift(model, args, device, show)
    log.info(f"train_irn: mean shift (dy, dx) = ({mean_shift[0]:.4f}, {mean_shift[1]:.4f})")
    save_torch(file_state(model), out_path)  # same weights, same bytes
    seconds = time.perf_counter() - start
    log.info(f"train_irn: saved {out_path} ({seconds:.1f} s)")
    last = history[-1]
    return {"weights": str(out_path), "max_step": max_step, "final_loss": last["total"],
            "final_losses": {k: last[k] for k in ("pos", "neg", "disp_fg", "disp_bg")},
            "mean_shift": mean_shift}


__all__ = ["run", "irn_weights_path", "ir_label_dir", "irn_module"]

"""Step train_cam (spec §6): multi-label classifier whose 1×1 classifier gives the CAMs.

The classifier has the data source's class count (VOC 20, COCO 80, §16.2); COCO trains on
train2014 and reports its validation loss on val2014.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datasets.transforms import TorchvisionNormalize
from datasets.views import ClassificationView, data_source
from irn.misc.runtime import (get_logger, progress, read_ids, resolve_device, save_torch, training_loader,
                              training_setup)
from irn.net import network_module
from irn.net.backbone import file_state
from utils.io import save_json
from utils.runtime import seeded_loader_kwargs


def multilabel_soft_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over batch and classes of −y·log σ(z) − (1−y)·log σ(−z) (§6.3)."""
    return F.multilabel_soft_margin_loss(logits, target)


def build_cam_net(args: Any, weights_from_imagenet: bool = True) -> nn.Module:
    """The training-form CAM network named by ``--cam_network`` (module exposing ``Net``)."""
    module = network_module(args.cam_network)
    return module.Net(depth=args.backbone_depth, weights=args.backbone_weights if weights_from_imagenet else None,
                      n_classes=data_source(args).num_classes, freeze_until=args.cam_freeze_until,
                      bn_mode=args.backbone_bn)


def _validate(model: nn.Module, loader: DataLoader, device: torch.device, show: bool) -> float:
    """Mean loss over the validation loader; prints only, no model selection (QUIRK-25 KEEP)."""
    total, n = 0.0, 0
    model.eval()  # matters only with --backbone_bn batch: no statistics updates from val data
    with torch.no_grad():
        for batch in progress(loader, "train_cam val", enabled=show, unit="batch"):
            logits = model(batch["img"].to(device))
            total += float(multilabel_soft_margin(logits, batch["label"].to(device)))
            n += 1
    model.train()
    return total / max(n, 1)


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    out_path = args.cam_weights_name
    if out_path.is_file() and not args.overwrite:
        log.info(f"train_cam: {out_path} exists, skipping (pass --overwrite to retrain)")
        return {"skipped": True, "weights": str(out_path)}
    device = resolve_device(args.device)
    show = not args.no_progress

    source = data_source(args)
    train_ids = read_ids(args, "train_list")
    dataset = ClassificationView(
        train_ids, source, resize_long=tuple(args.cam_resize_long), hor_flip=True,
        crop_size=args.cam_crop_size, crop_method="random", img_normal=TorchvisionNormalize())
    loader, max_step = training_loader(dataset, args.cam_batch_size, args.cam_num_epoches, args, device, "train_cam",
                                       "cam_batch_size")

    model = build_cam_net(args)
    optimizer, net = training_setup(model, args.cam_classifier_lr_mult, args.cam_learning_rate, args.cam_weight_decay,
                                    max_step, args, device)

    val_loader = None
    if args.cam_val_loss:
        val_ids = read_ids(args, "val_list")
        val_set = ClassificationView(val_ids, source, crop_size=args.cam_crop_size, crop_method="top_left")
        if len(val_set) >= args.cam_batch_size:
            val_loader = DataLoader(val_set, batch_size=args.cam_batch_size, shuffle=False, drop_last=True,
                                    **seeded_loader_kwargs(args.seed, args.num_workers))
        else:
            log.info(f"train_cam: {len(val_set)} val images < batch size; no validation loss")

    log.info(f"train_cam: {source.describe()}, {len(dataset)} images, batch {args.cam_batch_size}, "
             f"{args.cam_num_epoches} epochs, max_step {max_step}, ResNet-{args.backbone_depth}, "
             f"freeze_until {args.cam_freeze_until}, device {device}")
    start = time.perf_counter()
    last_loss = float("nan")
    history = []
    for epoch in range(args.cam_num_epoches):
        running, count = 0.0, 0
        bar = progress(loader, f"train_cam ep {epoch + 1}/{args.cam_num_epoches}", total=len(loader),
                       enabled=show, unit="batch")
        for batch in bar:
            logits = net(batch["img"].to(device, non_blocking=True))
            loss = multilabel_soft_margin(logits, batch["label"].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_loss = float(loss.detach())
            running += last_loss
            count += 1
            if show and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        record = {"epoch": epoch + 1, "train_loss": running / max(count, 1), "step": optimizer.global_step}
        if val_loader is not None:
            record["val_loss"] = _validate(net, val_loader, device, show)
        history.append(record)
        log.info("train_cam: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()))

    save_json(Path(args.log_dir) / "train_cam.json", {"max_step": max_step, "epochs": history})
    save_torch(file_state(model), out_path)  # same weights, same bytes
    log.info(f"train_cam: saved {out_path} ({time.perf_counter() - start:.1f} s)")
    out = {"weights": str(out_path), "max_step": max_step, "final_train_loss": history[-1]["train_loss"],
           "last_batch_loss": last_loss}
    if "val_loss" in history[-1]:
        out["final_val_loss"] = history[-1]["val_loss"]
    return out

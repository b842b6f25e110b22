"""Step make_cam (spec §7): multi-scale, flip-summed CAMs at stride 4 and full resolution.

Every id of ``train_list`` gets ``<cam_out_dir>/<id>.npy`` (see misc/cam_io.py; COCO: named by
file stem). An image without any class (COCO) gets a file too, with empty (0, ·, ·) stacks.
Ids whose file exists are skipped unless ``--overwrite``. With several CUDA devices (or
``--cpu_shards N``) one process per device takes a round-robin share of the ids; results do
not depend on the split.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.transforms import TorchvisionNormalize
from datasets.views import InferenceView, data_source
from irn.misc.cam_io import save_cam
from irn.misc.runtime import (first_item, get_logger, pending, progress, read_ids, run_on_devices, shard_workers,
                              worker_share)
from irn.net import network_module
from irn.net.backbone import resnet
from irn.net.resnet50_cam import load_cam_weights

NORM_EPS = 1e-5  # part of the CAM file definition (§7.2 step 5)


def stride4_size(h: int, w: int) -> tuple[int, int]:
    return math.ceil(h / 4), math.ceil(w / 4)


def strided_up_size(h: int, w: int) -> tuple[int, int]:
    """(16·ceil(H/16), 16·ceil(W/16)): the high-res CAM is resized to this, then cropped to H×W."""
    return 16 * math.ceil(h / 16), 16 * math.ceil(w / 16)


def normalise_channels(cam: torch.Tensor) -> torch.Tensor:
    """cam_k / (max(cam_k) + 1e-5) per channel; values in [0, 1), all-zero channels stay 0."""
    if cam.shape[0] == 0:
        return cam
    return cam / (cam.flatten(1).amax(1)[:, None, None] + NORM_EPS)


def cams_for_image(model: torch.nn.Module, inputs: Sequence[torch.Tensor], size: tuple[int, int],
                   label: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """§7.2 steps 2–5 for one image. ``inputs``: per scale the (2, 3, h_s, w_s) pair."""
    h, w = size
    s4 = stride4_size(h, w)
    up = strided_up_size(h, w)
    outputs = [model(x.to(device, non_blocking=True)) for x in inputs]  # each (C, h16_s, w16_s)
    strided = sum(F.interpolate(o[None], s4, mode="bilinear", align_corners=False)[0] for o in outputs)
    high = sum(F.interpolate(o[None], up, mode="bilinear", align_corners=False)[0] for o in outputs)
    high = high[:, :h, :w]
    keys = torch.nonzero(label.reshape(-1) > 0)[:, 0]
    strided = normalise_channels(strided[keys.to(strided.device)])
    high = normalise_channels(high[keys.to(high.device)])
    return {"keys": keys.cpu().numpy().astype(np.int64), "cam": strided.float().cpu().numpy(),
            "high_res": high.float().cpu().numpy()}


def build_cam_infer_net(args: Any) -> torch.nn.Module:
    module = network_module(args.cam_network)
    # The trained weights overwrite everything; no ImageNet file needed here (and no warning).
    backbone = resnet(args.backbone_depth)
    model = module.CAM(backbone=backbone, n_classes=data_source(args).num_classes)
    return load_cam_weights(model, args.cam_weights_name).eval()


def _work(part: int, n_parts: int, args: Any, ids: list[str]) -> None:
    device, mine = worker_share(args.device, part, n_parts, ids, args.torch_threads)
    if not mine:
        return
    model = build_cam_infer_net(args).to(device)
    dataset = InferenceView(mine, data_source(args), img_normal=TorchvisionNormalize(), scales=args.cam_scales)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=first_item,
                                         num_workers=shard_workers(args.num_workers, n_parts))
    out_dir = Path(args.cam_out_dir)
    with torch.no_grad():
        for item in progress(loader, f"make_cam[{part}]" if n_parts > 1 else "make_cam", total=len(mine),
                             enabled=not args.no_progress, position=part):
            imgs = item["img"] if isinstance(item["img"], list) else [item["img"]]
            res = cams_for_image(model, [torch.from_numpy(x) for x in imgs], item["size"], item["label"], device)
            save_cam(out_dir / f"{item['name']}.npy", res["keys"], res["cam"], res["high_res"])


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    ids = read_ids(args, "train_list")
    out_dir = Path(args.cam_out_dir)
    todo = pending(ids, [(out_dir, ".npy")], args.overwrite)
    log.info(f"make_cam: {data_source(args).describe()}, {len(ids)} ids, {len(ids) - len(todo)} already done, "
             f"scales {tuple(args.cam_scales)}")
    if todo:
        run_on_devices(_work, args, todo)
    return {"images": len(ids), "written": len(todo)}

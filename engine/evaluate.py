"""Validation: the nets' averaged logits against the (512x512 resized) labels (spec second-stage §6),
at the end of a training epoch (``validate``, called by engine/trainer.py)."""
from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler, Sampler
from tqdm import tqdm

from models.checkpoint import unwrap
from utils.config import Config
from utils.distributed import DistInfo, all_reduce_sum, broadcast_buffers
from utils.io import save_npy
from utils.metrics import confusion_matrix, segmentation_scores
from utils.runtime import net_input
from utils.voc import colorize

VAL_LOGITS = "val_logits"  # the validation's saved maps (train.val_mode dump_logits_only / save_val_logits)


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+n, r+2n, ... with no padding, so summed confusion
    matrices count every image exactly once (DistributedSampler would repeat some)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def val_sampler(length: int, rank: int, world_size: int, pad_like_ddp: bool) -> Sampler[int]:
    """Each id once (``ShardSampler``), or, with ``pad_like_ddp``, the reference's
    DistributedSampler(shuffle=False, drop_last=False), which pads the ids to a multiple of the
    world size so a few images count twice (QUIRK-S13: 1,449 VOC val ids on 4 GPUs -> 1,452)."""
    if not pad_like_ddp:
        return ShardSampler(length, rank, world_size)
    return DistributedSampler(range(length), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)


def average_logits(nets: list[nn.Module], images: torch.Tensor, key: str = "logits") -> torch.Tensor:
    return average_outputs(nets, images, (key,))[key]


def average_outputs(nets: list[nn.Module], images: torch.Tensor, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The nets' outputs ``keys`` averaged, float32, from one forward pass per net."""
    total: dict[str, torch.Tensor] = {}
    for net in nets:
        out = net(images)
        for k in keys:
            total[k] = out[k].float() if k not in total else total[k] + out[k].float()
    return {k: v / len(nets) for k, v in total.items()}


@torch.no_grad()
def evaluate(nets: list[nn.Module], loader, num_classes: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager], num_vis: int = 0,
             show_progress: bool = True, with_metrics: bool = True, dump_dir: Path | None = None,
             dump_dtype: str = "float32",
             layout: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> tuple[dict | None, list]:
    """Scores from the confusion matrix summed over all ranks (None without ``with_metrics``),
    plus up to ``num_vis`` (image, prediction, label) triples from this rank for pictures.

    ``dump_dir``: every image's averaged ``pre_logits`` saved as ``<id>.npy`` (the reference's
    COCO validation, QUIRK-S5), rewritten at each validation. ``layout``: the images in the nets'
    memory format (``utils.runtime.net_input``), as in training.

    Every rank calls the one all-reduce, also with an empty shard; the nets should be the bare
    modules, not DDP wrappers, whose forward can itself be a collective."""
    was_training = [n.training for n in nets]
    for n in nets:
        n.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    vis = []
    keys = ("logits", "pre_logits") if dump_dir is not None else ("logits",)
    for batch in tqdm(loader, desc="val", leave=False, disable=not show_progress, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast():
            out = average_outputs(nets, layout(images), keys)
        pred = out["logits"].argmax(1)
        if with_metrics:
            conf += confusion_matrix(pred, labels, num_classes)
        if dump_dir is not None:
            maps = out["pre_logits"].cpu().numpy().astype(dump_dtype)
            for item_id, arr in zip(batch["id"], maps):
                save_npy(dump_dir / f"{item_id}.npy", arr)
        for i in range(min(num_vis - len(vis), len(images))):
            vis.append((images[i].cpu(), pred[i].cpu(), labels[i].cpu()))
    all_reduce_sum(conf)
    for n, t in zip(nets, was_training):
        n.train(t)
    return (segmentation_scores(conf) if with_metrics else None), vis


def validate(nets: list[nn.Module], loader, cfg: Config, info: DistInfo,
             autocast: Callable[[], AbstractContextManager], run_dir: Path) -> tuple[dict | None, list]:
    """The epoch-end validation of the training's nets (``evaluate``'s scores and pictures), as
    ``train.val_mode`` asks: metrics, and the maps saved under ``<run>/val_logits`` with
    dump_logits_only or ``train.save_val_logits``."""
    dump = cfg.train.val_mode == "dump_logits_only" or cfg.train.save_val_logits
    # The bare nets, with rank 0's BatchNorm statistics as DDP's next forward would have given
    # them: through the DDP wrapper that forward is a collective, which a rank with an empty
    # validation shard never joins.
    bare = [unwrap(n) for n in nets]
    broadcast_buffers(bare)
    return evaluate(bare, loader, cfg.data.num_classes, info.device, autocast,
                    cfg.train.num_vis if info.is_main else 0, info.is_main,
                    with_metrics=cfg.train.val_mode == "metrics",
                    dump_dir=run_dir / VAL_LOGITS if dump else None,
                    dump_dtype=cfg.test.logits_dtype, layout=partial(net_input, cfg=cfg))


def vis_grid(vis: list, cfg: Config) -> np.ndarray:
    """Rows of image | prediction | ground truth (the label palette, VOC's for every data set), HWC uint8."""
    mean = np.array(cfg.data.mean)[:, None, None]
    std = np.array(cfg.data.std)[:, None, None]
    rows = []
    for image, pred, label in vis:
        img = np.clip((image.float().numpy() * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        rows.append(np.concatenate([img, colorize(pred.numpy()), colorize(label.numpy())], axis=1))
    return np.concatenate(rows, axis=0)

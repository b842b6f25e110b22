"""Validation: the nets' averaged logits against the (512x512 resized) labels (spec second-stage §6)."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from utils.distributed import all_reduce_sum
from utils.metrics import confusion_matrix, segmentation_scores


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+n, r+2n, ... with no padding, so summed confusion
    matrices count every image exactly once (DistributedSampler would repeat some)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def average_logits(nets: list[nn.Module], images: torch.Tensor, key: str = "logits") -> torch.Tensor:
    out = nets[0](images)[key].float()
    for net in nets[1:]:
        out = out + net(images)[key].float()
    return out / len(nets)


@torch.no_grad()
def evaluate(nets: list[nn.Module], loader, num_classes: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager], num_vis: int = 0,
             show_progress: bool = True) -> tuple[dict, list]:
    """Scores from the confusion matrix summed over all ranks, plus up to ``num_vis``
    (image, prediction, label) triples from this rank for pictures."""
    was_training = [n.training for n in nets]
    for n in nets:
        n.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    vis = []
    for batch in tqdm(loader, desc="val", leave=False, disable=not show_progress, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast():
            pred = average_logits(nets, images).argmax(1)
        conf += confusion_matrix(pred, labels, num_classes)
        for i in range(min(num_vis - len(vis), len(images))):
            vis.append((images[i].cpu(), pred[i].cpu(), labels[i].cpu()))
    all_reduce_sum(conf)
    for n, t in zip(nets, was_training):
        n.train(t)
    return segmentation_scores(conf), vis

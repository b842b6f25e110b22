"""What a training run is made of, built once before its first iteration: the run folder, the
data (a synthetic set generated when the config asks for one), the loaders with their epoch
sampler, and the method's nets (engine/trainer.py puts them to work)."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from datasets.build import dataset_entry
from datasets.segmentation import EvalSet, TrainSet, loader_worker_init, seed_worker_fn, val_subset_ids
from datasets.verify import preflight
from engine.beco import num_nets
from engine.evaluate import val_sampler
from models import build_model
from utils.config import Config, ConfigError
from utils.distributed import DistInfo, barrier, broadcast_object
from utils.logs import log
from utils.runtime import net_layout


def run_dir_for(cfg: Config, ckpt: str | None) -> Path:
    """``<path_base>/<tag><run_id>``, a time stamp if both are empty; a resumed run keeps its folder.

    In a process group the time stamp is rank 0's, on every rank: each rank reading its own
    clock split a run in two folders when the ranks straddled a second."""
    if ckpt:
        return Path(ckpt).resolve().parent
    name = cfg.logging.tag + (cfg.logging.run_id or "")
    return Path(cfg.logging.path_base) / (name or broadcast_object(time.strftime("%Y%m%d-%H%M%S")))


def ensure_data(cfg: Config, is_main: bool) -> None:
    """Generate the data set's synthetic set when the config asks for one.

    Same settings as the set on disk: nothing is written. Other settings: the
    generator refuses (FileExistsError) rather than train on a stale set.
    """
    syn = cfg.data.synthetic
    root = Path(cfg.data.root)
    if syn is not None and is_main:
        entry = dataset_entry(cfg.data.dataset)
        if not (root / entry.synthetic_summary).is_file():
            log.info(f"no data under {root}: generating the synthetic {cfg.data.dataset.upper()}-format set with simulated "
                     f"first-stage pseudo-labels and masks")
        summary = entry.make_synthetic(root, syn)
        log.info(f"synthetic data under {root}: pseudo-label mIoU {summary['pseudo_label']['miou']:.3f}")
    barrier()


class EpochSampler(DistributedSampler):
    """DistributedSampler whose epoch can start ``skip`` samples in, for a mid-epoch resume:
    the order is still a function of (seed, epoch) alone, so the resumed run sees the rest of
    the interrupted epoch's batches."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def train_loader(train_set: TrainSet, cfg: Config, info: DistInfo) -> DataLoader:
    """The training loader, with one sampler for every case: its order is a function of (seed,
    epoch), so a resumed run sees the same batches as an uninterrupted one."""
    sampler = EpochSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                           seed=cfg.train.seed, drop_last=True)
    workers = cfg.data.num_workers
    return DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=info.device.type == "cuda",
                      worker_init_fn=seed_worker_fn(cfg.train.seed, info.rank, workers),
                      persistent_workers=False)


def build_loaders(cfg: Config, info: DistInfo) -> tuple[DataLoader, DataLoader, EpochSampler]:
    """The training and validation loaders, after every file has passed the preflight, and the
    training loader's sampler (``set_epoch`` at each epoch, ``skip`` to resume mid-epoch)."""
    train_set = TrainSet(cfg.data)
    val_set = EvalSet(cfg.data, cfg.data.val_split)
    if cfg.train.val_subset is not None:
        val_set = EvalSet(cfg.data, cfg.data.val_split,
                          ids=val_subset_ids(val_set.ids, cfg.train.val_subset, cfg.train.val_subset_seed))
    preflight([(train_set, "train"), (val_set, "val")], info)
    per_step = cfg.data.batch_size * info.world_size * cfg.train.grad_accum
    if len(train_set) < per_step:
        raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} per process x {info.world_size} "
                          f"process(es) x {cfg.train.grad_accum} accumulation step(s) = {per_step} images per "
                          f"optimiser step exceeds the {len(train_set)} training images")
    loader = train_loader(train_set, cfg, info)
    val_loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size,
                            sampler=val_sampler(len(val_set), info.rank, info.world_size, cfg.train.val_pad_like_ddp),
                            num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                            worker_init_fn=loader_worker_init)
    return loader, val_loader, loader.sampler


def build_nets(cfg: Config, info: DistInfo, pretrained: bool = True) -> list[nn.Module]:
    """The method's nets from one config (two for BECO); each draws its own head init.
    ``pretrained=False`` skips the ImageNet file (a benchmark's nets with random weights)."""
    nets = []
    for _ in range(num_nets(cfg)):
        net = net_layout(build_model(cfg.model, cfg.data.num_classes, pretrained=pretrained).to(info.device), cfg)
        if info.distributed:
            # SyncBatchNorm runs on GPUs only; CPU (Gloo) processes keep per-process statistics.
            if info.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        if cfg.train.compile:
            net = torch.compile(net)
        nets.append(net)
    return nets


def batch_line(cfg: Config, world_size: int) -> str:
    """The batch every optimiser step sees and the learning rate, as logged at start and
    written at the top of the run's config.yaml (users who change the GPU count without
    changing the per-GPU batch train with another total than they think)."""
    total = cfg.data.batch_size * world_size * cfg.train.grad_accum
    return (f"total batch {total} = {cfg.data.batch_size} per process x {world_size} process(es) x "
            f"{cfg.train.grad_accum} accumulation step(s) (train.grad_accum); lr {cfg.optim.lr:g} (optim.lr)")

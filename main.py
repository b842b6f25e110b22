"""BECO second stage: train (default) or test (--test) two co-trained segmenters.

    python main.py --config configs/beco_voc.yaml [key=value ...]
    torchrun --nproc_per_node=4 main.py --config configs/beco_voc.yaml
    python main.py --config configs/beco_voc.yaml --ckpt data/logging/<run>/latest_ckpt.pth   # resume

Flags named as in the reference override the matching config keys; any other
key is overridden with trailing ``key=value`` pairs (``optim.lr=0.02``).
The training loop below reads top to bottom: one iteration is
``train_one_epoch`` -> ``engine.beco.training_step`` -> ``losses.beco_loss``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from engine.config import build_config
from utils.config import Config, ConfigError, apply_overrides, load_yaml, to_yaml
from utils.errors import BecoError, RunError, one_line

from utils.logs import log, log_error_to_file, setup_logging
from utils.schedule import poly_factor
from utils.runtime import (configure_backends, make_autocast, net_input, net_layout, set_seed,  # noqa: F401
                           uses_grad_scaler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/beco_voc.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.02")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 + grad scaling on CUDA, bf16 on CPU")
    p.add_argument("-dist", "--distributed", action="store_true",
                   help="spawn one process per visible GPU (torchrun needs no flag)")
    p.add_argument("--determ", action="store_true", help="deterministic algorithms, cudnn benchmark off")
    p.add_argument("--gpu_id", type=int, default=None, help="GPU to use in a single-process run")
    p.add_argument("--run_id", default=None, help="run folder suffix (logging.run_id)")
    p.add_argument("--logging_path_base", default=None, help="parent folder of run folders (logging.path_base)")
    p.add_argument("--logging_tag", default=None, help="run folder name prefix (logging.tag)")
    p.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    p.add_argument("--ckpt", default=None, help="resumable checkpoint to continue from, or nets to test with --test")
    p.add_argument("--test", action="store_true", help="test a checkpoint instead of training")
    p.add_argument("--overwrite", action="store_true",
                   help="with --test: recompute and rewrite score maps already saved (default: keep them)")
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="set by python -m torch.distributed.launch (LOCAL_RANK in the environment wins)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load --ckpt even if it holds pickled Python objects beyond tensors and plain values "
                        "(files of other projects or of older versions of this one). Unpickling runs code the "
                        "file names: a malicious file can do anything you can. Only for files whose source "
                        "you trust; without it such a file is refused")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume --ckpt with settings that differ from the checkpoint's (each is logged and "
                        "used: lr, epochs, ...); without it such a resume is refused, naming the keys")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p.parse_intermixed_args(argv)  # key=value pairs may come before or after flags


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file, then the reference-style flags, then key=value overrides (last wins)."""
    raw = load_yaml(args.config)
    flag_overrides = {
        "train.amp": True if args.amp else None,
        "train.deterministic": True if args.determ else None,
        "train.seed": args.seed,
        "logging.path_base": args.logging_path_base,
        "logging.tag": args.logging_tag,
        "logging.run_id": args.run_id,
    }
    for key, value in flag_overrides.items():
        if value is not None:
            section, name = key.split(".")
            raw[section][name] = value
    return build_config(apply_overrides(raw, args.overrides))


# ----------------------------------------------------------------------------- set-up

def run_dir_for(cfg: Config, ckpt: str | None) -> Path:
    """``<path_base>/<tag><run_id>``, a time stamp if both are empty; a resumed run keeps its folder.

    In a process group the time stamp is rank 0's, on every rank: each rank reading its own
    clock split a run in two folders when the ranks straddled a second."""
    from utils.distributed import broadcast_object
    if ckpt:
        return Path(ckpt).resolve().parent
    name = cfg.logging.tag + (cfg.logging.run_id or "")
    return Path(cfg.logging.path_base) / (name or broadcast_object(time.strftime("%Y%m%d-%H%M%S")))


def ensure_data(cfg: Config, is_main: bool) -> None:
    """Generate the data set's synthetic set when the config asks for one.

    Same settings as the set on disk: nothing is written. Other settings: the
    generator refuses (FileExistsError) rather than train on a stale set.
    """
    from datasets.build import dataset_entry
    from utils.distributed import barrier
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


def build_loaders(cfg: Config, info) -> tuple[DataLoader, DataLoader, "EpochSampler"]:
    from datasets.segmentation import EvalSet, TrainSet, loader_worker_init, seed_worker_fn, val_subset_ids
    from engine.evaluate import val_sampler
    train_set = TrainSet(cfg.data)
    val_set = EvalSet(cfg.data, cfg.data.val_split)
    if cfg.train.val_subset is not None:
        val_set = EvalSet(cfg.data, cfg.data.val_split,
                          ids=val_subset_ids(val_set.ids, cfg.train.val_subset, cfg.train.val_subset_seed))
    from datasets.verify import preflight
    preflight([(train_set, "train"), (val_set, "val")], info)
    # One sampler for every case: its order is a function of (seed, epoch), so a resumed
    # run sees the same batches as an uninterrupted one.
    sampler = EpochSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                           seed=cfg.train.seed, drop_last=True)
    per_step = cfg.data.batch_size * info.world_size * cfg.train.grad_accum
    if len(train_set) < per_step:
        raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} per process x {info.world_size} "
                          f"process(es) x {cfg.train.grad_accum} accumulation step(s) = {per_step} images per "
                          f"optimiser step exceeds the {len(train_set)} training images")
    workers = cfg.data.num_workers
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                              num_workers=workers, pin_memory=info.device.type == "cuda",
                              worker_init_fn=seed_worker_fn(cfg.train.seed, info.rank, workers),
                              persistent_workers=False)
    val_loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size,
                            sampler=val_sampler(len(val_set), info.rank, info.world_size, cfg.train.val_pad_like_ddp),
                            num_workers=workers, pin_memory=info.device.type == "cuda",
                            worker_init_fn=loader_worker_init)
    return train_loader, val_loader, sampler


def build_nets(cfg: Config, info) -> list[nn.Module]:
    """The method's nets from one config (two for BECO); each draws its own head init."""
    from engine.beco import num_nets
    from models import build_model
    nets = []
    for _ in range(num_nets(cfg)):
        net = net_layout(build_model(cfg.model, cfg.data.num_classes).to(info.device), cfg)
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


VAL_LOGITS = "val_logits"  # the validation's saved maps (train.val_mode dump_logits_only / save_val_logits)


class NonFiniteLoss(RunError):
    pass


class Preempted(RunError):
    """SIGTERM (a scheduler's preemption): the run saved a resumable checkpoint and stops."""
    exit_code = 143  # 128 + SIGTERM, what a scheduler expects of a process it stopped


class EpochSampler(DistributedSampler):
    """DistributedSampler whose epoch can start ``skip`` samples in, for a mid-epoch resume:
    the order is still a function of (seed, epoch) alone, so the resumed run sees the rest of
    the interrupted epoch's batches."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class Stop:
    """Set by SIGTERM; every rank stops at the same iteration (``agree_on_step`` within an
    epoch, ``now`` at its end)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True
        log.info("SIGTERM: saving a resumable checkpoint at the end of this iteration, then stopping")

    def now(self, info) -> bool:
        if not info.distributed:
            return self.requested
        flag = torch.full((1,), int(self.requested), device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def agree_on_step(terms: torch.Tensor, stop: Stop, info) -> tuple[list[float], bool, dict[int, list[float]]]:
    """What every rank must decide alike after an iteration, in one collective: this rank's
    loss terms, whether any rank was asked to stop (SIGTERM), and the ranks whose loss terms
    are not finite, with those terms. (A rank that raised alone on its own NaN left the others
    waiting in the next collective.) The ``tolist`` is the iteration's one device-to-host
    transfer, which logging needs anyway."""
    row = torch.cat([terms.detach().float(), torch.full((1,), float(stop.requested), device=terms.device)])
    if info.distributed:
        parts = [torch.empty_like(row) for _ in range(info.world_size)]
        torch.distributed.all_gather(parts, row)
        table = torch.stack(parts)
    else:
        table = row[None]
    rows = table.tolist()
    non_finite = {rank: r[:-1] for rank, r in enumerate(rows) if not all(math.isfinite(v) for v in r[:-1])}
    return rows[info.rank][:-1], any(r[-1] for r in rows), non_finite


def accumulate_step(nets: list[nn.Module], batches: list[dict], epoch: int, cfg: Config, autocast,
                    device: torch.device, scaler) -> dict[str, torch.Tensor]:
    """Forward and backward of ``train.grad_accum`` micro-batches for one optimiser step.

    Each micro-batch's loss is divided by their number, so the summed gradients are the mean
    of the micro-batches' gradients: what the same micro-batches on as many GPUs give under
    DDP (the reference's 16 = 4 GPUs x 4), and one big batch's for a loss that is a mean over
    images of equal size and nets without batch statistics. Under DDP only the last backward
    all-reduces. Returns the loss terms averaged over the micro-batches."""
    from engine.beco import training_step
    n = len(batches)
    total: dict[str, torch.Tensor] = {}
    for k, batch in enumerate(batches):
        last = k == n - 1
        syncs = [n_.no_sync() for n_ in nets if not last and hasattr(n_, "no_sync")]
        with contextlib.ExitStack() as stack:
            for ctx in syncs:
                stack.enter_context(ctx)
            losses = training_step(nets, batch, epoch, cfg, autocast, device)
            scaler.scale(losses["total"] / n).backward()
        for key, value in losses.items():
            total[key] = value.detach() / n if key not in total else total[key] + value.detach() / n
    return total


# ----------------------------------------------------------------------------- training

def train_one_epoch(nets, loader, optimizer, scheduler, scaler, epoch: int, it0: int, cfg: Config,
                    info, autocast, writer, metrics_file, save_resumable, stop: Stop,
                    rng_after_iter: dict | None = None, skip_steps: int = 0) -> int:
    """One epoch from iteration ``it0`` (mid-epoch when resumed, ``skip_steps`` of the epoch's
    optimiser steps done); returns the next iteration.

    Every ``train.ckpt_interval`` iterations, and on SIGTERM, ``save_resumable(epoch, it)``
    writes latest_ckpt.pth. ``rng_after_iter``: the RNG state of a mid-epoch checkpoint,
    restored once the loader's iterator exists (creating it draws from torch's RNG, which
    the interrupted run did before the checkpoint).
    """
    accum = cfg.train.grad_accum
    skipped = skip_steps * accum  # loader batches the interrupted run consumed
    # Without loader workers the augmentation draws come from this process's RNG, which the
    # checkpoint restores: the sampler just starts later. Workers' draws come from their own
    # RNG, seeded afresh at each epoch start; they load the skipped batches again (nothing is
    # trained on them) so that their streams reach where the interrupted run left them.
    replay = skipped if loader.num_workers > 0 else 0
    loader.sampler.skip = (skipped - replay) * cfg.data.batch_size
    try:
        return _epoch_steps(nets, loader, optimizer, scheduler, scaler, epoch, it0, cfg, info, autocast, writer,
                            metrics_file, save_resumable, stop, rng_after_iter, replay)
    finally:
        loader.sampler.skip = 0


def _epoch_steps(nets, loader, optimizer, scheduler, scaler, epoch: int, it0: int, cfg: Config, info, autocast,
                 writer, metrics_file, save_resumable, stop: Stop, rng_after_iter: dict | None, replay: int) -> int:
    for n in nets:
        n.train()
    it = it0
    iterator = iter(loader)
    if rng_after_iter is not None:
        from engine.checkpoint import set_rng_state
        set_rng_state(rng_after_iter)
    for _ in tqdm(range(replay), desc="replaying the loader to the checkpoint", disable=not info.is_main or not replay,
                  dynamic_ncols=True, leave=False):
        next(iterator)
    accum = cfg.train.grad_accum
    iters_per_epoch = loader.sampler.num_samples // (cfg.data.batch_size * accum)
    steps = (len(loader) - replay) // accum  # optimiser steps left in this (maybe resumed) epoch
    images_per_step = cfg.data.batch_size * info.world_size * accum
    t0 = time.time()
    # A context, so an error leaves a clean console line rather than one glued to the bar.
    with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not info.is_main,
              dynamic_ncols=True, leave=False) as bar:
        for step in range(steps):
            batches = [next(iterator) for _ in range(accum)]
            optimizer.zero_grad(set_to_none=True)
            losses = accumulate_step(nets, batches, epoch, cfg, autocast, info.device, scaler)
            scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            mine, stopping, non_finite = agree_on_step(torch.stack(list(losses.values())), stop, info)
            values = dict(zip(losses, mine))
            if non_finite:
                first = min(non_finite)
                where = f" on rank(s) {sorted(non_finite)}" if info.distributed else ""
                terms = ", ".join(f"{k}={v}" for k, v in zip(losses, non_finite[first]))
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, iteration {it}{where} ({terms}); "
                                    f"the last good checkpoint is left as it was")
            bar.update(1)
            if info.is_main:
                images_per_s = (step + 1) * images_per_step / (time.time() - t0)
                bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                metrics_file.write(json.dumps({"epoch": epoch, "iter": it, "lr": lr, **values}) + "\n")
                if it % cfg.train.log_interval == 0:
                    for k, v in values.items():
                        writer.add_scalar(f"train/loss_{k}", v, it)
                    writer.add_scalar("train/lr", lr, it)
            it += 1
            if it % iters_per_epoch == 0:
                break  # the epoch end validates and writes its checkpoint (then stops on SIGTERM)
            if stopping or (cfg.train.ckpt_interval and it % cfg.train.ckpt_interval == 0):
                path = save_resumable(epoch, it)
            if stopping:
                raise Preempted(f"stopped by SIGTERM at iteration {it}; resume with --ckpt {path}")
    if info.is_main:
        metrics_file.flush()
    return it


def vis_grid(vis: list, cfg: Config) -> np.ndarray:
    """Rows of image | prediction | ground truth (the label palette, VOC's for every data set), HWC uint8."""
    from utils.voc import colorize
    mean = np.array(cfg.data.mean)[:, None, None]
    std = np.array(cfg.data.std)[:, None, None]
    rows = []
    for image, pred, label in vis:
        img = np.clip((image.float().numpy() * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        rows.append(np.concatenate([img, colorize(pred.numpy()), colorize(label.numpy())], axis=1))
    return np.concatenate(rows, axis=0)


def _resume_state(cfg: Config, args: argparse.Namespace) -> dict:
    """The checkpoint to resume from, checked before anything is written: resumable, and made
    with this run's settings (``--allow-config-change`` lets keys differ, each one logged)."""
    from engine import checkpoint as ckpt_io
    state = ckpt_io.load(args.ckpt, trust=getattr(args, "trust_checkpoint", False))
    if "optimizer" not in state:
        raise RunError(f"{args.ckpt} holds networks only; resume needs a resumable checkpoint ({ckpt_io.LATEST})")
    if "config" in state:
        from utils.config import to_dict
        import yaml
        saved = to_dict(build_config(yaml.safe_load(state["config"])))
        changes = ckpt_io.config_changes(saved, to_dict(cfg))
        if changes:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:12])
            more = f" (and {len(changes) - 12} more)" if len(changes) > 12 else ""
            if not args.allow_config_change:
                raise RunError(f"resuming {args.ckpt} with other settings than it was trained with: {listed}{more}. "
                               f"Drop the overrides to continue the run as it was, or pass --allow-config-change "
                               f"to continue with the new values")
            log.warning(f"--allow-config-change: continuing {args.ckpt} with {listed}{more}")
        state["_changes"] = changes
    return state


def _apply_optimizer_config(optimizer, scheduler, fresh_groups: list[dict], it: int) -> None:
    """After loading a checkpoint's optimiser and scheduler, take this run's hyperparameters
    (lr, momentum, weight decay, ...) from the freshly built optimiser: an allowed config
    change must be honoured, not silently replaced by the checkpoint's values."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k != "params"})
    scheduler.base_lrs = [g["initial_lr"] for g in fresh_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(it)


def train(cfg: Config, args: argparse.Namespace) -> dict:
    from engine import checkpoint as ckpt_io
    from engine.evaluate import evaluate
    from models import build_optimizer
    from utils.distributed import barrier, broadcast_buffers, init_distributed
    from utils.io import save_text
    from utils.logs import setup_console_logging

    configure_backends(cfg)  # before CUDA and NCCL start: --determ's cuBLAS setting is read then
    info = init_distributed(args.gpu_id, cfg.dist.timeout_min)
    set_seed(cfg.train.seed + info.rank)
    run_dir = run_dir_for(cfg, args.ckpt)
    if info.is_main:
        setup_console_logging()
    # Nothing is written into the run folder until the run is known to be valid.
    state = _resume_state(cfg, args) if args.ckpt else None
    if state is None:
        ckpt_io.check_new_run_folder(run_dir)

    ensure_data(cfg, info.is_main)
    train_loader, val_loader, sampler = build_loaders(cfg, info)
    nets = build_nets(cfg, info)
    optimizer = build_optimizer(nets, cfg.optim)
    accum = cfg.train.grad_accum
    iters_per_epoch = len(train_loader) // accum  # optimiser steps
    max_it = cfg.train.epochs * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        poly_factor, max_it=max_it, power=cfg.optim.poly_power, floor=cfg.optim.min_lr / cfg.optim.lr))
    scaler = torch.amp.GradScaler(info.device.type, enabled=uses_grad_scaler(cfg, info.device))
    autocast = make_autocast(cfg, info.device)

    start_it, best_miou, rng_after_iter = 0, -1.0, None
    if state is not None:
        saved_ipe = state.get("iters_per_epoch", state["iteration"] // (state["epoch"] + 1))
        if saved_ipe != iters_per_epoch:
            raise RunError(f"{args.ckpt} was written with {saved_ipe} iterations per epoch, this run has "
                           f"{iters_per_epoch}: batch size, processes or data differ")
        fresh_groups = [dict(g) for g in optimizer.param_groups]
        ckpt_io.load_nets(state, nets, args.ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_it, best_miou = state["iteration"], state["best_miou"]
        if state["_changes"]:
            _apply_optimizer_config(optimizer, scheduler, fresh_groups, start_it)
        rng = state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0]
        if start_it % iters_per_epoch:
            rng_after_iter = rng  # mid-epoch: restored once the epoch's loader iterator exists
        else:
            ckpt_io.set_rng_state(rng)
    start_epoch, skip = divmod(start_it, iters_per_epoch)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_io.remove_stale_temporaries(run_dir)
        if state is not None:  # what the interrupted run logged after its checkpoint goes
            ckpt_io.truncate_jsonl(run_dir / "train_log.jsonl", lambda r: r.get("iter", -1) < start_it)
            ckpt_io.truncate_jsonl(run_dir / "val_log.jsonl", lambda r: r.get("epoch", 0) <= start_epoch)
            if state["_changes"] and (run_dir / "config.yaml").is_file():
                save_text(run_dir / f"config.before-iteration-{start_it}.yaml", (run_dir / "config.yaml").read_text())
        save_text(run_dir / "config.yaml", f"# {batch_line(cfg, info.world_size)}\n" + to_yaml(cfg))
    barrier()
    setup_logging(run_dir / "train.log" if info.is_main else None)
    log.info(f"run folder {run_dir} | {info.world_size} process(es) on {info.device} | "
             f"method {cfg.method.name} | model {cfg.model.name} | amp {cfg.train.amp}")
    log.info(batch_line(cfg, info.world_size))
    if info.is_main and stale:
        log.info(f"removed {len(stale)} temporary file(s) a killed write left behind")
    if state is not None:
        log.info(f"resumed from {args.ckpt}: epoch {start_epoch + 1}, iteration {start_it}"
                 + (f" ({skip} of the epoch's {iters_per_epoch} done)" if skip else ""))

    # Every rank gathers its RNG state so a resumed multi-process run continues each stream.
    def gathered_rng() -> list:
        rng = [ckpt_io.rng_state()]
        if info.distributed:
            out = [None] * info.world_size
            torch.distributed.all_gather_object(out, rng[0])
            rng = out
        return rng

    def save_resumable(epoch: int, it: int, rng: list | None = None) -> Path:
        rng = rng or gathered_rng()
        path = run_dir / ckpt_io.LATEST
        if info.is_main:
            ckpt_io.save(path, {
                "net_state_dict": {name: ckpt_io.unwrap(n).state_dict() for name, n in zip(ckpt_io.NET_NAMES, nets)},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng, "epoch": epoch, "iteration": it,
                "iters_per_epoch": iters_per_epoch, "best_miou": best_miou,
                "method": {"name": cfg.method.name, "epoch": epoch}, "config": to_yaml(cfg)})
            metrics_file.flush()
        # No rank goes on (or exits, after SIGTERM) before rank 0's checkpoint is on disk: srun
        # --kill-on-bad-exit and torchrun stop every rank once one has exited.
        barrier()
        return path

    stop = Stop()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    from datasets.build import dataset_entry
    class_names = dataset_entry(cfg.data.dataset).class_names(cfg.data.num_classes)
    writer = metrics_file = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir / "tb")
        metrics_file = open(run_dir / "train_log.jsonl", "a", buffering=1)  # line-buffered: survives a kill
    history = []
    it = start_it
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            sampler.set_epoch(epoch)
            t_epoch = time.time()
            it = train_one_epoch(nets, train_loader, optimizer, scheduler, scaler, epoch, it, cfg, info,
                                 autocast, writer, metrics_file, save_resumable, stop,
                                 rng_after_iter if epoch == start_epoch else None,
                                 skip if epoch == start_epoch else 0)
            scores = None
            validated = (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.train.epochs
            if validated:
                dump = cfg.train.val_mode == "dump_logits_only" or cfg.train.save_val_logits
                # The bare nets, with rank 0's BatchNorm statistics as DDP's next forward would
                # have given them: through the DDP wrapper that forward is a collective, which a
                # rank with an empty validation shard never joins.
                bare = [ckpt_io.unwrap(n) for n in nets]
                broadcast_buffers(bare)
                scores, vis = evaluate(bare, val_loader, cfg.data.num_classes, info.device, autocast,
                                       cfg.train.num_vis if info.is_main else 0, info.is_main,
                                       with_metrics=cfg.train.val_mode == "metrics",
                                       dump_dir=run_dir / VAL_LOGITS if dump else None,
                                       dump_dtype=cfg.test.logits_dtype, layout=partial(net_input, cfg=cfg))
            rng = gathered_rng()
            improved = scores is not None and scores["miou"] > best_miou
            if improved:
                best_miou = scores["miou"]
                if info.is_main:
                    ckpt_io.save_best(run_dir / ckpt_io.BEST, nets)
            save_resumable(epoch, it, rng)
            if info.is_main:
                record = {"epoch": epoch + 1, "iteration": it, "time_s": round(time.time() - t_epoch, 2)}
                if scores is not None:
                    record.update({k: v for k, v in scores.items() if k != "iou"})
                    for k in ("miou", "pixel_acc", "mean_acc", "mean_precision"):
                        writer.add_scalar(f"val/{k}", scores[k], epoch + 1)
                    for name, iou in zip(class_names, scores["iou"]):  # classes absent from val: no point
                        if iou is not None:
                            writer.add_scalar(f"val_iou/{name}", iou, epoch + 1)
                    if vis:
                        writer.add_image("val/image_pred_gt", vis_grid(vis, cfg), epoch + 1, dataformats="HWC")
                    log.info(f"epoch {epoch + 1}: val mIoU {scores['miou']:.4f} pixel acc {scores['pixel_acc']:.4f}"
                             f"{' (best)' if improved else ''} | {record['time_s']} s")
                elif validated:  # val_mode dump_logits_only: maps, no metric (the reference's coco_set)
                    log.info(f"epoch {epoch + 1}: val maps saved to {run_dir / VAL_LOGITS} (val_mode "
                             f"dump_logits_only: no metric, no {ckpt_io.BEST}) | {record['time_s']} s")
                history.append(record)
                with open(run_dir / "val_log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            barrier()
            if stop.now(info):
                raise Preempted(f"stopped by SIGTERM at the end of epoch {epoch + 1}; resume with --ckpt "
                                f"{run_dir / ckpt_io.LATEST}")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if info.is_main:
            metrics_file.close()
            writer.close()
    if info.distributed:
        check_ranks_agree(nets, info)
    log.info(f"done: best val mIoU {best_miou:.4f}; checkpoints in {run_dir}")
    return {"run_dir": str(run_dir), "best_miou": best_miou, "history": history}


def batch_line(cfg: Config, world_size: int) -> str:
    """The batch every optimiser step sees and the learning rate, as logged at start and
    written at the top of the run's config.yaml (users who change the GPU count without
    changing the per-GPU batch train with another total than they think)."""
    total = cfg.data.batch_size * world_size * cfg.train.grad_accum
    return (f"total batch {total} = {cfg.data.batch_size} per process x {world_size} process(es) x "
            f"{cfg.train.grad_accum} accumulation step(s) (train.grad_accum); lr {cfg.optim.lr:g} (optim.lr)")


def check_ranks_agree(nets: list[nn.Module], info) -> bool:
    """Every rank holds the same parameters (DDP keeps them so; a rank that silently diverged
    would make rank 0's checkpoint the wrong one to trust). BatchNorm statistics are per rank
    on the CPU, so only parameters are compared."""
    from engine.checkpoint import unwrap
    digest = [float(sum(p.detach().double().sum() for p in unwrap(n).parameters())) for n in nets]
    everyone = [None] * info.world_size
    torch.distributed.all_gather_object(everyone, digest)
    agree = all(d == everyone[0] for d in everyone)
    log.info(f"parameters of all {info.world_size} ranks agree" if agree else
             f"WARNING: the ranks' parameters differ: {everyone}")
    return agree


def _spawned(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    from utils.distributed import spawn_env
    spawn_env(rank, world_size, port)
    code = main(argv, spawned=True)
    if code:
        sys.exit(code)  # the parent returns it (a return value would be lost)


def spawn_per_gpu(argv: list[str]) -> int:
    """``-dist``: one process per visible GPU, each running this command. A SIGTERM to the
    parent alone is passed on to the ranks (they save a checkpoint and stop); the parent exits
    with the first failing rank's code (143 after SIGTERM), as srun does."""
    from utils.distributed import free_port
    n = torch.cuda.device_count()
    context = mp.start_processes(_spawned, args=(n, free_port(), argv), nprocs=n, join=False,
                                 start_method="spawn")

    def forward(signum, frame) -> None:
        for proc in context.processes:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, forward)
    from utils.distributed import HANDSHAKE_S
    try:
        # The grace: once a rank fails, the others stop on their own (utils/distributed.py's
        # handshake) and the failing rank's line stays the last one printed.
        while not context.join(grace_period=HANDSHAKE_S + 5):
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code > 0 else 128 - e.exit_code  # killed by a signal: 128 + its number
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def resolve_ckpt(cfg: Config, ckpt: str | None) -> str | None:
    """A bare checkpoint name (``--ckpt best_ckpt.pth``, the reference README's test command)
    that is not a file here is looked up in the run folder the tag names."""
    if ckpt is None or Path(ckpt).exists() or Path(ckpt).name != ckpt:
        return ckpt
    name = cfg.logging.tag + (cfg.logging.run_id or "")
    candidate = Path(cfg.logging.path_base) / name / ckpt
    if name and candidate.is_file():
        print(f"--ckpt {ckpt}: using {candidate}", file=sys.stderr)
        return str(candidate)
    return ckpt


def main(argv: list[str] | None = None, spawned: bool = False) -> int:
    from engine.config import resolve_batch
    from utils.distributed import apply_local_rank_flag, launched_by_torchrun, launched_world_size, slurm_env
    args = parse_args(argv)
    apply_local_rank_flag(args.local_rank)
    slurm_env()
    try:
        cfg = resolve_batch(resolve_config(args), launched_world_size())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.ckpt = resolve_ckpt(cfg, args.ckpt)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    if args.distributed and not spawned:
        if launched_by_torchrun():
            n = launched_world_size()
            print(f"error: -dist spawns one process per GPU, but a launcher already started {n} "
                  f"process{'es' if n != 1 else ''} (torchrun, torch.distributed.launch or an srun step): "
                  f"leave -dist out", file=sys.stderr)
            return 2
        if torch.cuda.device_count() == 0:
            print("error: -dist spawns one process per GPU and there is none; on the CPU use "
                  "torchrun --nproc_per_node=N main.py ...", file=sys.stderr)
            return 2
        return spawn_per_gpu(sys.argv[1:] if argv is None else argv)
    from utils.distributed import cleanup, failed_rank, failing_rank, release, stopped_for
    try:
        if args.test:  # every rank tests its own shard of the ids
            from engine.inference import run_test
            run_test(cfg, args)
        else:
            train(cfg, args)
    except BecoError as e:
        # Bad input, a refused resume, a diverged or preempted run: one line on the console (also
        # for errors raised in a loader worker), the traceback in the run's log. Anything else is
        # a bug and keeps its traceback. In a process group the line comes after the other
        # ranks have stopped, so it is the last one a rank prints.
        message = one_line(e)
        log_error_to_file(f"error: {message}", sys.exc_info())
        release(e)
        with failing_rank(f"error: {message}"):
            print(f"error: {message}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception as e:
        # A collective broken because another rank stopped on its error: that rank prints why.
        failed = failed_rank()
        if failed is None:
            # A bug (its traceback is kept): in a process group it is printed last too.
            first = next(iter(str(e).splitlines()), "")
            release(e)  # the traceback stays printable: only its frames' locals go
            with failing_rank(f"{type(e).__name__}: {first}"):
                pass
            raise
        rank = int(os.environ.get("RANK", "0"))
        line = f"error: rank {rank} stopped: rank {failed} failed (its error follows)"
        log_error_to_file(line, sys.exc_info())
        print(line, file=sys.stderr, flush=True)
        release(e)
        stopped_for(failed, line)
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

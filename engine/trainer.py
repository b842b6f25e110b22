"""The training loop (spec second-stage §5-6): epochs of optimiser steps, each epoch ending in
validation and a resumable checkpoint; a resume (also from mid-epoch) and a preemption
(SIGTERM: save, then stop with exit code 143).

One iteration reads through three files: ``train_one_epoch`` -> ``train_step`` ->
``accumulate_step`` here, the method's ``engine.beco.training_step`` (mixing, augmentation,
the forward passes), and its loss in ``losses/beco_loss.py``. What the loop carries from one
iteration to the next (nets, optimiser, scheduler, scaler, autocast, logging handles) is one
``Run``; a checkpoint is a plain dict (``save_resumable``).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.build import dataset_entry
from engine import beco  # training_step through the module: a test or benchmark that wraps it is seen
from engine import checkpoint as ckpt_io
from engine.build import batch_line, build_loaders, build_nets, ensure_data, run_dir_for
from engine.evaluate import VAL_LOGITS, validate, vis_grid
from models import build_optimizer
from engine.config import build_config
from utils.config import Config, to_dict, to_yaml
from utils.distributed import DistInfo, barrier, init_distributed
from utils.errors import RunError
from utils.io import save_text
from utils.logs import log, setup_console_logging, setup_logging
from utils.runtime import configure_backends, make_autocast, set_seed, uses_grad_scaler
from utils.schedule import poly_factor


class NonFiniteLoss(RunError):
    pass


class Preempted(RunError):
    """SIGTERM (a scheduler's preemption): the run saved a resumable checkpoint and stops."""
    exit_code = 143  # 128 + SIGTERM, what a scheduler expects of a process it stopped


class Stop:
    """Set by SIGTERM; every rank stops at the same iteration (``agree_on_step`` within an
    epoch, ``now`` at its end)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True
        log.info("SIGTERM: saving a resumable checkpoint at the end of this iteration, then stopping")

    def now(self, info: DistInfo) -> bool:
        if not info.distributed:
            return self.requested
        flag = torch.full((1,), int(self.requested), device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Run:
    """What the loop carries from one iteration to the next. ``train_step`` needs the first six
    fields only (a benchmark builds just those); ``fit`` fills the rest."""
    cfg: Config
    info: DistInfo
    nets: list[nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    run_dir: Path | None = None
    iters_per_epoch: int = 0  # optimiser steps
    best_miou: float = -1.0
    stop: Stop = field(default_factory=Stop)
    writer: Any = None  # TensorBoard's SummaryWriter, rank 0 only
    metrics_file: IO[str] | None = None  # train_log.jsonl, rank 0 only


# ----------------------------------------------------------------------------- the run

def fit(cfg: Config, ckpt: str | None, *, gpu_id: int | None, trust_checkpoint: bool,
        allow_config_change: bool) -> dict:
    """Train from scratch, or resume the run of ``ckpt`` (its latest_ckpt.pth); returns the run
    folder, the best val mIoU and the epochs' records."""
    run, train_loader, val_loader, state = start(cfg, ckpt, gpu_id, trust_checkpoint, allow_config_change)
    start_it, rng_after_iter = (0, None) if state is None else restore(run, state, ckpt)
    start_epoch, skip = divmod(start_it, run.iters_per_epoch)
    open_run_folder(run, state, start_it)
    if state is not None:
        log.info(f"resumed from {ckpt}: epoch {start_epoch + 1}, iteration {start_it}"
                 + (f" ({skip} of the epoch's {run.iters_per_epoch} done)" if skip else ""))
    previous_handler = signal.signal(signal.SIGTERM, run.stop)
    class_names = dataset_entry(cfg.data.dataset).class_names(cfg.data.num_classes)
    if run.info.is_main:
        # Imported here: TensorBoard takes seconds to import, and only a training rank 0 writes to it.
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(run.run_dir / "tb")
        run.metrics_file = open(run.run_dir / "train_log.jsonl", "a", buffering=1)  # line-buffered: survives a kill
    history = []
    it = start_it
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            train_loader.sampler.set_epoch(epoch)
            t_epoch = time.time()
            first = epoch == start_epoch
            it = train_one_epoch(run, train_loader, epoch, it, rng_after_iter if first else None, skip if first else 0)
            record = end_epoch(run, val_loader, epoch, it, t_epoch, class_names)
            if record is not None:
                history.append(record)
            barrier()
            if run.stop.now(run.info):
                raise Preempted(f"stopped by SIGTERM at the end of epoch {epoch + 1}; resume with --ckpt "
                                f"{run.run_dir / ckpt_io.LATEST}")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if run.info.is_main:
            run.metrics_file.close()
            run.writer.close()
    if run.info.distributed:
        check_ranks_agree(run.nets, run.info)
    log.info(f"done: best val mIoU {run.best_miou:.4f}; checkpoints in {run.run_dir}")
    return {"run_dir": str(run.run_dir), "best_miou": run.best_miou, "history": history}


def start(cfg: Config, ckpt: str | None, gpu_id: int | None, trust_checkpoint: bool,
          allow_config_change: bool) -> tuple[Run, DataLoader, DataLoader, dict | None]:
    """The process set up, the checkpoint to resume checked, the data, loaders, nets, optimiser,
    schedule and scaler built: a ``Run`` and the training and validation loaders, and the
    checkpoint's dict (None for a new run). Nothing goes into the run folder yet."""
    configure_backends(cfg)  # before CUDA and NCCL start: --determ's cuBLAS setting is read then
    info = init_distributed(gpu_id, cfg.dist.timeout_min)
    set_seed(cfg.train.seed + info.rank)
    run_dir = run_dir_for(cfg, ckpt)
    if info.is_main:
        setup_console_logging()
    # Nothing is written into the run folder until the run is known to be valid.
    state = resume_state(cfg, ckpt, trust_checkpoint, allow_config_change) if ckpt else None
    if state is None:
        ckpt_io.check_new_run_folder(run_dir)

    ensure_data(cfg, info.is_main)
    train_loader, val_loader, _ = build_loaders(cfg, info)
    nets = build_nets(cfg, info)
    optimizer = build_optimizer(nets, cfg.optim)
    iters_per_epoch = len(train_loader) // cfg.train.grad_accum  # optimiser steps
    max_it = cfg.train.epochs * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        poly_factor, max_it=max_it, power=cfg.optim.poly_power, floor=cfg.optim.min_lr / cfg.optim.lr))
    scaler = torch.amp.GradScaler(info.device.type, enabled=uses_grad_scaler(cfg, info.device))
    run = Run(cfg, info, nets, optimizer, scaler, make_autocast(cfg, info.device), scheduler, run_dir, iters_per_epoch)
    return run, train_loader, val_loader, state


def open_run_folder(run: Run, state: dict | None, start_it: int) -> None:
    """Rank 0 writes the run folder's config.yaml (keeping the one a changed resume replaces)
    and drops what an interrupted run logged after its checkpoint; then every rank logs to
    train.log."""
    cfg, info, run_dir = run.cfg, run.info, run.run_dir
    start_epoch = start_it // run.iters_per_epoch
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


def check_ranks_agree(nets: list[nn.Module], info: DistInfo) -> bool:
    """Every rank holds the same parameters (DDP keeps them so; a rank that silently diverged
    would make rank 0's checkpoint the wrong one to trust). BatchNorm statistics are per rank
    on the CPU, so only parameters are compared."""
    digest = [float(sum(p.detach().double().sum() for p in ckpt_io.unwrap(n).parameters())) for n in nets]
    everyone = [None] * info.world_size
    torch.distributed.all_gather_object(everyone, digest)
    agree = all(d == everyone[0] for d in everyone)
    log.info(f"parameters of all {info.world_size} ranks agree" if agree else
             f"WARNING: the ranks' parameters differ: {everyone}")
    return agree


# ----------------------------------------------------------------------------- resume

def resume_state(cfg: Config, ckpt: str, trust_checkpoint: bool, allow_config_change: bool) -> dict:
    """The checkpoint to resume from, checked before anything is written: resumable, and made
    with this run's settings (``--allow-config-change`` lets keys differ, each one logged)."""
    state = ckpt_io.load(ckpt, trust=trust_checkpoint)
    if "optimizer" not in state:
        raise RunError(f"{ckpt} holds networks only; resume needs a resumable checkpoint ({ckpt_io.LATEST})")
    if "config" in state:
        saved = to_dict(build_config(yaml.safe_load(state["config"])))
        changes = ckpt_io.config_changes(saved, to_dict(cfg))
        if changes:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:12])
            more = f" (and {len(changes) - 12} more)" if len(changes) > 12 else ""
            if not allow_config_change:
                raise RunError(f"resuming {ckpt} with other settings than it was trained with: {listed}{more}. "
                               f"Drop the overrides to continue the run as it was, or pass --allow-config-change "
                               f"to continue with the new values")
            log.warning(f"--allow-config-change: continuing {ckpt} with {listed}{more}")
        state["_changes"] = changes
    return state


def restore(run: Run, state: dict, ckpt: str) -> tuple[int, dict | None]:
    """Load a checked checkpoint (``resume_state``) into the run. Returns the iteration to go on
    from and, for a mid-epoch checkpoint, its RNG state, to restore once the epoch's loader
    iterator exists (creating it draws from torch's RNG, which the interrupted run did before
    the checkpoint); an epoch-end checkpoint's RNG state is restored here."""
    saved_ipe = state.get("iters_per_epoch", state["iteration"] // (state["epoch"] + 1))
    if saved_ipe != run.iters_per_epoch:
        raise RunError(f"{ckpt} was written with {saved_ipe} iterations per epoch, this run has "
                       f"{run.iters_per_epoch}: batch size, processes or data differ")
    fresh_groups = [dict(g) for g in run.optimizer.param_groups]
    ckpt_io.load_nets(state, run.nets, ckpt)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    start_it, run.best_miou = state["iteration"], state["best_miou"]
    if state["_changes"]:
        _apply_optimizer_config(run.optimizer, run.scheduler, fresh_groups, start_it)
    rng = state["rng"][run.info.rank] if run.info.rank < len(state["rng"]) else state["rng"][0]
    if start_it % run.iters_per_epoch:
        return start_it, rng
    ckpt_io.set_rng_state(rng)
    return start_it, None


def _apply_optimizer_config(optimizer, scheduler, fresh_groups: list[dict], it: int) -> None:
    """After loading a checkpoint's optimiser and scheduler, take this run's hyperparameters
    (lr, momentum, weight decay, ...) from the freshly built optimiser: an allowed config
    change must be honoured, not silently replaced by the checkpoint's values."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k != "params"})
    scheduler.base_lrs = [g["initial_lr"] for g in fresh_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(it)


def gathered_rng(info: DistInfo) -> list:
    """Every rank's RNG state, so a resumed multi-process run continues each stream."""
    rng = [ckpt_io.rng_state()]
    if info.distributed:
        out = [None] * info.world_size
        torch.distributed.all_gather_object(out, rng[0])
        rng = out
    return rng


def save_resumable(run: Run, epoch: int, it: int, rng: list | None = None) -> Path:
    """latest_ckpt.pth: a plain dict of the nets, optimiser, scheduler, scaler, every rank's RNG
    state and where the run is; ``rng`` when the caller gathered it already."""
    rng = rng or gathered_rng(run.info)
    path = run.run_dir / ckpt_io.LATEST
    if run.info.is_main:
        cfg = run.cfg
        ckpt_io.save(path, {
            "net_state_dict": {name: ckpt_io.unwrap(n).state_dict() for name, n in zip(ckpt_io.NET_NAMES, run.nets)},
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "rng": rng, "epoch": epoch, "iteration": it,
            "iters_per_epoch": run.iters_per_epoch, "best_miou": run.best_miou,
            "method": {"name": cfg.method.name, "epoch": epoch}, "config": to_yaml(cfg)})
        run.metrics_file.flush()
    # No rank goes on (or exits, after SIGTERM) before rank 0's checkpoint is on disk: srun
    # --kill-on-bad-exit and torchrun stop every rank once one has exited.
    barrier()
    return path


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(run: Run, loader: DataLoader, epoch: int, it0: int, rng_after_iter: dict | None = None,
                    skip_steps: int = 0) -> int:
    """One epoch from iteration ``it0`` (mid-epoch when resumed, ``skip_steps`` of the epoch's
    optimiser steps done); returns the next iteration.

    Every ``train.ckpt_interval`` iterations, and on SIGTERM, ``save_resumable`` writes
    latest_ckpt.pth. ``rng_after_iter``: the RNG state of a mid-epoch checkpoint (``restore``).
    """
    skipped = skip_steps * run.cfg.train.grad_accum  # loader batches the interrupted run consumed
    # Without loader workers the augmentation draws come from this process's RNG, which the
    # checkpoint restores: the sampler just starts later. Workers' draws come from their own
    # RNG, seeded afresh at each epoch start; they load the skipped batches again (nothing is
    # trained on them) so that their streams reach where the interrupted run left them.
    replay = skipped if loader.num_workers > 0 else 0
    loader.sampler.skip = (skipped - replay) * run.cfg.data.batch_size
    try:
        return _epoch_steps(run, loader, epoch, it0, rng_after_iter, replay)
    finally:
        loader.sampler.skip = 0


def _epoch_steps(run: Run, loader: DataLoader, epoch: int, it0: int, rng_after_iter: dict | None,
                 replay: int) -> int:
    cfg, info = run.cfg, run.info
    for n in run.nets:
        n.train()
    it = it0
    iterator = iter(loader)
    if rng_after_iter is not None:
        ckpt_io.set_rng_state(rng_after_iter)
    for _ in tqdm(range(replay), desc="replaying the loader to the checkpoint", disable=not info.is_main or not replay,
                  dynamic_ncols=True, leave=False):
        next(iterator)
    accum = cfg.train.grad_accum
    steps = (len(loader) - replay) // accum  # optimiser steps left in this (maybe resumed) epoch
    images_per_step = cfg.data.batch_size * info.world_size * accum
    t0 = time.time()
    # A context, so an error leaves a clean console line rather than one glued to the bar.
    with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not info.is_main,
              dynamic_ncols=True, leave=False) as bar:
        for step in range(steps):
            batches = [next(iterator) for _ in range(accum)]
            losses = train_step(run, batches, epoch)
            lr = run.optimizer.param_groups[0]["lr"]
            run.scheduler.step()
            values, stopping = _agree(run, losses, epoch, it)
            bar.update(1)
            if info.is_main:
                images_per_s = (step + 1) * images_per_step / (time.time() - t0)
                _log_step(run, bar, epoch, it, lr, values, images_per_s)
            it += 1
            if it % run.iters_per_epoch == 0:
                break  # the epoch end validates and writes its checkpoint (then stops on SIGTERM)
            if stopping or (cfg.train.ckpt_interval and it % cfg.train.ckpt_interval == 0):
                path = save_resumable(run, epoch, it)
            if stopping:
                raise Preempted(f"stopped by SIGTERM at iteration {it}; resume with --ckpt {path}")
    if info.is_main:
        run.metrics_file.flush()
    return it


def _agree(run: Run, losses: dict[str, torch.Tensor], epoch: int, it: int) -> tuple[dict[str, float], bool]:
    """This rank's loss terms as numbers and whether to stop (SIGTERM on any rank); a
    non-finite loss on any rank stops every rank with the same error."""
    mine, stopping, non_finite = agree_on_step(torch.stack(list(losses.values())), run.stop, run.info)
    if non_finite:
        first = min(non_finite)
        where = f" on rank(s) {sorted(non_finite)}" if run.info.distributed else ""
        terms = ", ".join(f"{k}={v}" for k, v in zip(losses, non_finite[first]))
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, iteration {it}{where} ({terms}); "
                            f"the last good checkpoint is left as it was")
    return dict(zip(losses, mine)), stopping


def _log_step(run: Run, bar: tqdm, epoch: int, it: int, lr: float, values: dict[str, float],
              images_per_s: float) -> None:
    """Rank 0: the progress bar, a train_log.jsonl line, and TensorBoard every ``train.log_interval``."""
    bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
    run.metrics_file.write(json.dumps({"epoch": epoch, "iter": it, "lr": lr, **values}) + "\n")
    if it % run.cfg.train.log_interval == 0:
        for k, v in values.items():
            run.writer.add_scalar(f"train/loss_{k}", v, it)
        run.writer.add_scalar("train/lr", lr, it)


def end_epoch(run: Run, val_loader: DataLoader, epoch: int, it: int, t_epoch: float,
              class_names: list[str]) -> dict | None:
    """Validate (every ``train.val_interval`` epochs and after the last), keep the best nets in
    best_ckpt.pth, write latest_ckpt.pth; rank 0 logs the epoch and returns its record."""
    cfg, info = run.cfg, run.info
    scores = vis = None
    validated = (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.train.epochs
    if validated:
        scores, vis = validate(run.nets, val_loader, cfg, info, run.autocast, run.run_dir)
    rng = gathered_rng(info)
    improved = scores is not None and scores["miou"] > run.best_miou
    if improved:
        run.best_miou = scores["miou"]
        if info.is_main:
            ckpt_io.save_best(run.run_dir / ckpt_io.BEST, run.nets)
    save_resumable(run, epoch, it, rng)
    if not info.is_main:
        return None
    record = {"epoch": epoch + 1, "iteration": it, "time_s": round(time.time() - t_epoch, 2)}
    if scores is not None:
        record.update({k: v for k, v in scores.items() if k != "iou"})
        _write_val_scalars(run, epoch, scores, vis, class_names)
        log.info(f"epoch {epoch + 1}: val mIoU {scores['miou']:.4f} pixel acc {scores['pixel_acc']:.4f}"
                 f"{' (best)' if improved else ''} | {record['time_s']} s")
    elif validated:  # val_mode dump_logits_only: maps, no metric (the reference's coco_set)
        log.info(f"epoch {epoch + 1}: val maps saved to {run.run_dir / VAL_LOGITS} (val_mode "
                 f"dump_logits_only: no metric, no {ckpt_io.BEST}) | {record['time_s']} s")
    with open(run.run_dir / "val_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _write_val_scalars(run: Run, epoch: int, scores: dict, vis: list, class_names: list[str]) -> None:
    for k in ("miou", "pixel_acc", "mean_acc", "mean_precision"):
        run.writer.add_scalar(f"val/{k}", scores[k], epoch + 1)
    for name, iou in zip(class_names, scores["iou"]):  # classes absent from val: no point
        if iou is not None:
            run.writer.add_scalar(f"val_iou/{name}", iou, epoch + 1)
    if vis:
        run.writer.add_image("val/image_pred_gt", vis_grid(vis, run.cfg), epoch + 1, dataformats="HWC")


# ----------------------------------------------------------------------------- one iteration

def train_step(run: Run, batches: list[dict], epoch: int) -> dict[str, torch.Tensor]:
    """One optimiser step on ``train.grad_accum`` micro-batches; returns the loss terms (on the
    device, averaged over the micro-batches). The schedule's step is the caller's."""
    run.optimizer.zero_grad(set_to_none=True)
    losses = accumulate_step(run.nets, batches, epoch, run.cfg, run.autocast, run.info.device, run.scaler)
    run.scaler.step(run.optimizer)  # skipped by the scaler when fp16 gradients overflowed
    run.scaler.update()
    return losses


def accumulate_step(nets: list[nn.Module], batches: list[dict], epoch: int, cfg: Config, autocast,
                    device: torch.device, scaler) -> dict[str, torch.Tensor]:
    """Forward and backward of ``train.grad_accum`` micro-batches for one optimiser step.

    Each micro-batch's loss is divided by their number, so the summed gradients are the mean
    of the micro-batches' gradients: what the same micro-batches on as many GPUs give under
    DDP (the reference's 16 = 4 GPUs x 4), and one big batch's for a loss that is a mean over
    images of equal size and nets without batch statistics. Under DDP only the last backward
    all-reduces. Returns the loss terms averaged over the micro-batches."""
    n = len(batches)
    total: dict[str, torch.Tensor] = {}
    for k, batch in enumerate(batches):
        last = k == n - 1
        syncs = [n_.no_sync() for n_ in nets if not last and hasattr(n_, "no_sync")]
        with contextlib.ExitStack() as stack:
            for ctx in syncs:
                stack.enter_context(ctx)
            losses = beco.training_step(nets, batch, epoch, cfg, autocast, device)
            scaler.scale(losses["total"] / n).backward()
        for key, value in losses.items():
            total[key] = value.detach() / n if key not in total else total[key] + value.detach() / n
    return total


def agree_on_step(terms: torch.Tensor, stop: Stop, info: DistInfo) -> tuple[list[float], bool, dict[int, list[float]]]:
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

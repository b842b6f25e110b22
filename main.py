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
import json
import math
import os
import random
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

from utils.config import Config, ConfigError, apply_overrides, build_config, load_yaml, to_yaml

from utils.logs import log, log_error_to_file, setup_logging


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

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(cfg: Config) -> None:
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32


def run_dir_for(cfg: Config, ckpt: str | None) -> Path:
    """``<path_base>/<tag><run_id>``, a time stamp if both are empty; a resumed run keeps its folder."""
    if ckpt:
        return Path(ckpt).resolve().parent
    name = cfg.logging.tag + (cfg.logging.run_id or "")
    return Path(cfg.logging.path_base) / (name or time.strftime("%Y%m%d-%H%M%S"))


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


def build_loaders(cfg: Config, info) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    from datasets.segmentation import EvalSet, TrainSet, seed_worker_fn, val_subset_ids
    from engine.evaluate import ShardSampler
    train_set = TrainSet(cfg.data)
    val_set = EvalSet(cfg.data, cfg.data.val_split)
    if cfg.train.val_subset is not None:
        val_set = EvalSet(cfg.data, cfg.data.val_split,
                          ids=val_subset_ids(val_set.ids, cfg.train.val_subset, cfg.train.val_subset_seed))
    # One sampler for every case: its order is a function of (seed, epoch), so a resumed
    # run sees the same batches as an uninterrupted one.
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    if len(train_set) < cfg.data.batch_size * info.world_size:
        raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} per process x {info.world_size} "
                          f"processes exceeds the {len(train_set)} training images")
    workers = cfg.data.num_workers
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                              num_workers=workers, pin_memory=info.device.type == "cuda",
                              worker_init_fn=seed_worker_fn(cfg.train.seed, info.rank, workers),
                              persistent_workers=False)
    val_loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size,
                            sampler=ShardSampler(len(val_set), info.rank, info.world_size),
                            num_workers=workers, pin_memory=info.device.type == "cuda")
    return train_loader, val_loader, sampler


def build_nets(cfg: Config, info) -> list[nn.Module]:
    """The method's nets from one config (two for BECO); each draws its own head init."""
    from engine.beco import num_nets
    from models import build_model
    nets = []
    for _ in range(num_nets(cfg)):
        net = build_model(cfg.model, cfg.data.num_classes).to(info.device)
        if info.distributed:
            # SyncBatchNorm runs on GPUs only; CPU (Gloo) processes keep per-process statistics.
            if info.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        nets.append(net)
    return nets


def poly_factor(it: int, max_it: int, power: float, floor: float) -> float:
    """lr / base_lr of the poly schedule with a floor: max((1 - it/max_it)^power, floor)."""
    return max((1 - it / max_it) ** power, floor) if it < max_it else floor


def make_autocast(cfg: Config, device: torch.device):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=cfg.train.amp)


VAL_LOGITS = "val_logits"  # the validation's saved maps (train.val_mode dump_logits_only / save_val_logits)


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- training

def train_one_epoch(nets, loader, optimizer, scheduler, scaler, epoch: int, it0: int, cfg: Config,
                    info, autocast, writer, metrics_file) -> int:
    from engine.beco import training_step
    for n in nets:
        n.train()
    it = it0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not info.is_main,
               dynamic_ncols=True, leave=False)
    t0 = time.time()
    for step, batch in enumerate(bar):
        losses = training_step(nets, batch, epoch, cfg, autocast, info.device)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        values = {k: v.item() for k, v in losses.items()}
        if not math.isfinite(values["total"]):
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, iteration {it} "
                                f"({', '.join(f'{k}={v}' for k, v in values.items())}); "
                                f"the last good checkpoint is left as it was")
        if info.is_main:
            images_per_s = (step + 1) * cfg.data.batch_size * info.world_size / (time.time() - t0)
            bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
            metrics_file.write(json.dumps({"epoch": epoch, "iter": it, "lr": lr, **values}) + "\n")
            if it % cfg.train.log_interval == 0:
                for k, v in values.items():
                    writer.add_scalar(f"train/loss_{k}", v, it)
                writer.add_scalar("train/lr", lr, it)
        it += 1
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


def train(cfg: Config, args: argparse.Namespace) -> dict:
    from engine import checkpoint as ckpt_io
    from engine.evaluate import evaluate
    from models import build_optimizer
    from utils.distributed import barrier, init_distributed
    from utils.io import save_text

    info = init_distributed(args.gpu_id)
    configure_backends(cfg)
    set_seed(cfg.train.seed + info.rank)
    run_dir = run_dir_for(cfg, args.ckpt)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_text(run_dir / "config.yaml", to_yaml(cfg))
    setup_logging(run_dir / "train.log" if info.is_main else None)
    log.info(f"run folder {run_dir} | {info.world_size} process(es) on {info.device} | "
             f"method {cfg.method.name} | model {cfg.model.name} | amp {cfg.train.amp}")

    ensure_data(cfg, info.is_main)
    train_loader, val_loader, sampler = build_loaders(cfg, info)
    nets = build_nets(cfg, info)
    optimizer = build_optimizer(nets, cfg.optim)
    iters_per_epoch = len(train_loader)
    max_it = cfg.train.epochs * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        poly_factor, max_it=max_it, power=cfg.optim.poly_power, floor=cfg.optim.min_lr / cfg.optim.lr))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp and info.device.type == "cuda")
    autocast = make_autocast(cfg, info.device)

    start_epoch, best_miou = 0, -1.0
    if args.ckpt:
        state = ckpt_io.load(args.ckpt)
        if "optimizer" not in state:
            raise ValueError(f"{args.ckpt} holds networks only; resume needs a resumable checkpoint "
                             f"({ckpt_io.LATEST})")
        ckpt_io.load_nets(state, nets, args.ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_miou = state["epoch"] + 1, state["best_miou"]
        if state["iteration"] != start_epoch * iters_per_epoch:
            raise ValueError(f"{args.ckpt} was written with {state['iteration'] // (state['epoch'] + 1)} "
                             f"iterations per epoch, this run has {iters_per_epoch}: batch size or data differ")
        ckpt_io.set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
        log.info(f"resumed from {args.ckpt}: epoch {start_epoch + 1}, iteration {start_epoch * iters_per_epoch}")

    from datasets.build import dataset_entry
    class_names = dataset_entry(cfg.data.dataset).class_names(cfg.data.num_classes)
    writer = metrics_file = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir / "tb")
        metrics_file = open(run_dir / "train_log.jsonl", "a", buffering=1)  # line-buffered: survives a kill
    history = []
    it = start_epoch * iters_per_epoch
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            sampler.set_epoch(epoch)
            t_epoch = time.time()
            it = train_one_epoch(nets, train_loader, optimizer, scheduler, scaler, epoch, it, cfg, info,
                                 autocast, writer, metrics_file)
            scores = None
            validated = (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.train.epochs
            if validated:
                dump = cfg.train.val_mode == "dump_logits_only" or cfg.train.save_val_logits
                scores, vis = evaluate(nets, val_loader, cfg.data.num_classes, info.device, autocast,
                                       cfg.train.num_vis if info.is_main else 0, info.is_main,
                                       with_metrics=cfg.train.val_mode == "metrics",
                                       dump_dir=run_dir / VAL_LOGITS if dump else None,
                                       dump_dtype=cfg.test.logits_dtype)
            # Every rank gathers its RNG state so a resumed multi-process run continues each stream.
            rng = [ckpt_io.rng_state()]
            if info.distributed:
                gathered = [None] * info.world_size
                torch.distributed.all_gather_object(gathered, rng[0])
                rng = gathered
            if info.is_main:
                improved = scores is not None and scores["miou"] > best_miou
                if improved:
                    best_miou = scores["miou"]
                    ckpt_io.save_best(run_dir / ckpt_io.BEST, nets)
                ckpt_io.save(run_dir / ckpt_io.LATEST, {
                    "net_state_dict": {name: ckpt_io.unwrap(n).state_dict() for name, n in zip(ckpt_io.NET_NAMES, nets)},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng, "epoch": epoch, "iteration": it,
                    "best_miou": best_miou, "method": {"name": cfg.method.name, "epoch": epoch},
                    "config": to_yaml(cfg)})
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
    finally:
        if info.is_main:
            metrics_file.close()
            writer.close()
    log.info(f"done: best val mIoU {best_miou:.4f}; checkpoints in {run_dir}")
    return {"run_dir": str(run_dir), "best_miou": best_miou, "history": history}


def _spawned(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    from utils.distributed import spawn_env
    spawn_env(rank, world_size, port)
    main(argv, spawned=True)


def main(argv: list[str] | None = None, spawned: bool = False) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    if args.distributed and not spawned and "RANK" not in os.environ:
        from utils.distributed import free_port
        n = torch.cuda.device_count()
        if n == 0:
            print("error: -dist spawns one process per GPU and there is none; on the CPU use "
                  "torchrun --nproc_per_node=N main.py ...", file=sys.stderr)
            return 2
        mp.spawn(_spawned, args=(n, free_port(), sys.argv[1:] if argv is None else argv), nprocs=n)
        return 0
    from datasets.readers import DataError
    from utils.distributed import cleanup
    try:
        if args.test:  # every rank tests its own shard of the ids
            from engine.inference import run_test
            run_test(cfg, args)
        else:
            train(cfg, args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError, NonFiniteLoss) as e:
        # Bad input or a diverged run: a clear message on the console, the traceback in the run's log.
        log_error_to_file(f"error: {e}", sys.exc_info())
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

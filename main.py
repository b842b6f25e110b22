"""BECO second stage: train (default) or test (--test) two co-trained segmenters.

    python main.py --config configs/beco_voc.yaml [key=value ...]
    torchrun --nproc_per_node=4 main.py --config configs/beco_voc.yaml
    python main.py --config configs/beco_voc.yaml --ckpt data/logging/<run>/latest_ckpt.pth   # resume

Flags named as in the reference override the matching config keys; any other
key is overridden with trailing ``key=value`` pairs (``optim.lr=0.02``).
This file is the command line: it parses, resolves the config, launches (one process,
``-dist``'s one per GPU, or the processes torchrun started) and calls the engine. One training
iteration reads through three files: engine/trainer.py (the loop: ``train_one_epoch``) ->
engine/beco.py (``training_step``) -> losses/beco_loss.py.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from engine import launch
from engine.inference import run_test
from engine.trainer import fit
from engine.config import build_config, resolve_batch
from utils.config import Config, ConfigError, apply_overrides, load_yaml, to_yaml
from utils.distributed import apply_local_rank_flag, launched_world_size, slurm_env


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
        refusal = launch.dist_refusal()
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        return launch.spawn_per_gpu(main, sys.argv[1:] if argv is None else argv)
    if args.test:  # every rank tests its own shard of the ids
        work = partial(run_test, cfg, args.ckpt, gpu_id=args.gpu_id, overwrite=args.overwrite,
                       trust_checkpoint=args.trust_checkpoint)
    else:
        work = partial(fit, cfg, args.ckpt, gpu_id=args.gpu_id, trust_checkpoint=args.trust_checkpoint,
                       allow_config_change=args.allow_config_change)
    return launch.exit_code_of(work)


if __name__ == "__main__":
    sys.exit(main())

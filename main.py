"""BECO second stage: train (default) or test (--test) two co-trained DeepLabV3+ nets.

    python main.py --config configs/beco_voc.yaml [key=value ...]
    torchrun --nproc_per_node=4 main.py --config configs/beco_voc.yaml
    python main.py --config configs/beco_voc.yaml --test --ckpt best_ckpt.pth

Flags named as in the reference override the matching config keys; any other
key is overridden with trailing ``key=value`` pairs (``optim.lr=0.02``).
"""
from __future__ import annotations

import argparse
import sys

from utils.config import Config, ConfigError, apply_overrides, build_config, load_yaml, to_yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/beco_voc.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.02")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 + grad scaling on CUDA, bf16 on CPU")
    p.add_argument("-dist", "--distributed", action="store_true",
                   help="one process per visible GPU (spawned); torchrun needs no flag")
    p.add_argument("--determ", action="store_true", help="deterministic algorithms, cudnn benchmark off")
    p.add_argument("--gpu_id", type=int, default=None, help="GPU to use in a single-process run")
    p.add_argument("--run_id", default=None, help="run folder suffix (default: a time stamp)")
    p.add_argument("--logging_path_base", default=None, help="parent folder of run folders (logging.path_base)")
    p.add_argument("--logging_tag", default=None, help="run folder name prefix (logging.tag)")
    p.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    p.add_argument("--ckpt", default=None, help="checkpoint to resume from, or to test with --test")
    p.add_argument("--test", action="store_true", help="test a checkpoint instead of training")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    print("error: training and testing are not part of this version yet; "
          "use --print-config to inspect the resolved config", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

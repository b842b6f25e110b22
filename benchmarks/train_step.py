"""Time the training step of any segmenter (BECO: 2 nets, mixing, strong augmentation,
loss, backward, optimiser step).

    python benchmarks/train_step.py                                       # CPU size: demo.yaml (DeepLabV3+ R18), 128 px
    python benchmarks/train_step.py --config configs/demo_segformer.yaml  # SegFormer MiT-B0 at CPU size
    python benchmarks/train_step.py --config configs/demo.yaml model.name=deeplabv2 model.backbone.depth=18
    python benchmarks/train_step.py --config configs/beco_voc.yaml --size 512 --batch 4 [--amp]  # reference per GPU
    python benchmarks/train_step.py --config configs/beco_voc_segformer_b2.yaml --size 512

Any config and trailing ``key=value`` overrides, as for main.py; the nets are built
by the same ``models.build_model`` without ImageNet weights, and each step is the training
loop's ``engine.trainer.train_step`` (zero_grad, the method's step, scaled backward, the
optimiser and scaler steps; the schedule left out). Synthetic random batches,
so it measures compute only (no data loading). Prints iterations/s, images/s and, on
CUDA, peak memory.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from engine.beco import num_nets
from engine.trainer import Run, train_step
from utils.runtime import keep_host_memory, make_autocast
from models import build_model, build_optimizer
from engine.config import load_config
from utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"), help="config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.name=deeplabv2")
    p.add_argument("--size", type=int, default=128, help="square crop size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--epoch", type=int, default=1, help="1 = after warm-up: online labels and band are computed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_intermixed_args()

    device = torch.device(args.device)
    cfg = load_config(args.config, [*args.overrides, f"data.crop_size={args.size}", f"data.batch_size={args.batch}",
                                    f"train.amp={str(args.amp).lower()}"])
    torch.backends.cudnn.benchmark = True
    keep_host_memory(cfg.train.keep_host_memory)  # as main.py does
    nets = [build_model(cfg.model, cfg.data.num_classes, pretrained=False).to(device) for _ in range(num_nets(cfg))]
    opt = build_optimizer(nets, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    autocast = make_autocast(cfg, device)
    g = torch.Generator().manual_seed(0)
    c = cfg.data.num_classes
    batch = {"image": torch.randn(args.batch, 3, args.size, args.size, generator=g),
             "label": torch.randint(0, c, (args.batch, args.size, args.size), generator=g),
             "mask": torch.randint(0, 2, (args.batch, args.size, args.size), generator=g)}

    run = Run(cfg, DistInfo(0, 1, 0, device), nets, opt, scaler, autocast)

    def step() -> None:
        train_step(run, [batch], args.epoch)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.iters
    mem = f" peak_mem_gib {torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else ""
    params = sum(p.numel() for p in nets[0].parameters())
    print(f"device {device} {cfg.method.name} {cfg.model.name} ({params:,} parameters per net) size {args.size} "
          f"batch {args.batch} amp {args.amp}: "
          f"{1 / dt:.2f} it/s {args.batch / dt:.1f} img/s{mem}")


if __name__ == "__main__":
    main()

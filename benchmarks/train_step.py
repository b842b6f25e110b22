"""Time the BECO training step (2 nets, mixing, strong augmentation, loss, backward, SGD).

    python benchmarks/train_step.py                                   # CPU-sized: R18, 128 px, batch 4
    python benchmarks/train_step.py --depth 101 --size 512 --batch 4  # the reference's per-GPU setting
    python benchmarks/train_step.py --depth 101 --size 512 --batch 4 --amp

Synthetic random batches, so it measures compute only (no data loading). Prints
iterations/s, images/s and, on CUDA, peak memory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.beco import training_step  # noqa: E402
from main import make_autocast  # noqa: E402
from models import DeepLabV3Plus  # noqa: E402
from utils.config import load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--epoch", type=int, default=1, help="1 = after warm-up: online labels and band are computed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/beco_voc.yaml",
                      [f"model.backbone.depth={args.depth}", "model.backbone.pretrained=null",
                       f"data.crop_size={args.size}", f"train.amp={str(args.amp).lower()}"])
    torch.backends.cudnn.benchmark = True
    nets = [DeepLabV3Plus(vars(cfg.model.backbone), vars(cfg.model.decoder)).to(device) for _ in range(2)]
    opt = torch.optim.SGD([{"params": n.parameters()} for n in nets], lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    autocast = make_autocast(cfg, device)
    g = torch.Generator().manual_seed(0)
    c = cfg.data.num_classes
    batch = {"image": torch.randn(args.batch, 3, args.size, args.size, generator=g),
             "label": torch.randint(0, c, (args.batch, args.size, args.size), generator=g),
             "mask": torch.randint(0, 2, (args.batch, args.size, args.size), generator=g)}

    def step() -> None:
        losses = training_step(nets, batch, args.epoch, cfg, autocast, device)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(opt)
        scaler.update()

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
    print(f"device {device} depth {args.depth} size {args.size} batch {args.batch} amp {args.amp}: "
          f"{1 / dt:.2f} it/s {args.batch / dt:.1f} img/s{mem}")


if __name__ == "__main__":
    main()

"""The non-network work of one BECO training step, part by part.

    python benchmarks/step_overhead.py                      # B = 4, 512 x 512, 21 classes, 2 threads
    python benchmarks/step_overhead.py --size 96 --batch 8  # the demo's size

After warm-up (online labels on): the online labels from the nets' averaged logits
(softmax + max; the logits are random, the networks are not run), the boundary-enhanced
mixing, and the strong augmentation with the reference's settings (colour + HSV, grey,
blur), each timed alone, then all three in sequence as in ``engine.beco.beco_step``.
Median over ``--repeats`` runs after one warm-up run. The issue's target: <= 0.08 s on
2 CPU threads at B = 4, 512 x 512 (the reference spends 0.16 s there).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engine.beco import augment, confident_labels
from engine.mixing import mix_batch
from engine.strong_aug import normalize
from engine.config import load_config
from utils.runtime import keep_host_memory

REPO = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(batch: int, size: int, classes: int, seed: int, noise_images: bool, mean, std) -> dict:
    """Random logits, blocky labels, and images that are either photo-like (smooth colour
    fields plus pixel noise of 4 levels: neighbouring pixels have close colours, as in
    photos) or pure noise (every pixel an independent colour: the worst case for the
    colour lookups, whose table reads then all miss the cache)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (batch, size // 32, size // 32), generator=g)
    label = torch.nn.functional.interpolate(label[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    if noise_images:
        raw = torch.rand(batch, 3, size, size, generator=g) * 255
    else:
        coarse = torch.rand(batch, 3, max(size // 32, 2), max(size // 32, 2), generator=g) * 255
        raw = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        raw = (raw + 4 * torch.randn(batch, 3, size, size, generator=g)).clamp(0, 255)
    return {"images": normalize(raw, mean, std), "label": label,
            "mask": (torch.rand(batch, size, size, generator=g) < 0.5).long(),
            "logits": torch.randn(batch, classes, size, size, generator=g)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-images", action="store_true",
                   help="pure-noise images: the colour tables' worst case (default: photo-like images)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "configs/beco_voc.yaml")
    kept = keep_host_memory(cfg.train.keep_host_memory)  # as main.py does
    method, data = cfg.method, cfg.data
    x = inputs(args.batch, args.size, args.classes, args.seed, args.noise_images, data.mean, data.std)

    def online() -> tuple[torch.Tensor, torch.Tensor]:
        return confident_labels(x["logits"], method.threshold)

    online_label, online_mask = online()

    def mixing() -> dict:
        return mix_batch(x["images"], x["label"], x["mask"], online_label, online_mask, False, method,
                         args.classes, random.Random(args.seed), np.random.RandomState(args.seed))

    def augmentation() -> torch.Tensor:
        return augment(x["images"], cfg)

    def whole() -> None:
        lab, msk = online()
        mixed = mix_batch(x["images"], x["label"], x["mask"], lab, msk, False, method, args.classes,
                          random.Random(args.seed), np.random.RandomState(args.seed))
        augment(mixed["images"], cfg)

    parts = {"online labels (softmax + max)": online, "boundary-enhanced mixing": mixing,
             "strong augmentation": augmentation, "total (as in the step)": whole}
    print(f"B = {args.batch}, {args.size} x {args.size}, {args.classes} classes, {args.threads} threads, "
          f"median of {args.repeats} (torch {torch.__version__}; {'photo-like' if not args.noise_images else 'noise'} "
          f"images; train.keep_host_memory {'on' if kept else 'off'})")
    results = {}
    for name, fn in parts.items():
        results[name] = median_seconds(fn, args.repeats)
        print(f"  {name:<32}{results[name]:8.3f} s")
    return results


if __name__ == "__main__":
    main()

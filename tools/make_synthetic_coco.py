"""Write the synthetic COCO-2014-format tree (see datasets/synthetic/coco.py) and prepare it
(masks, lists, image-level labels: tools/prepare_coco.py).

    python tools/make_synthetic_coco.py --out data/synthetic_coco [--train 24 --val 8
        --size 96 128 --classes 5 --seed 0 --overwrite]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from datasets.prepare.coco import CocoPrepareError
from datasets.synthetic.coco import make_synthetic_coco_from_config
from tools.make_synthetic_voc import add_scene_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="COCO root to write")
    p.add_argument("--train", type=int, default=24, help="train2014 images, >= 3 (default 24)")
    p.add_argument("--val", type=int, default=8, help="val2014 images, >= 3 (default 8)")
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"),
                   help="image size (default 96 128)")
    p.add_argument("--size-jitter", type=float, default=0.0, help="per-image size factor range 1 +- j (default 0)")
    p.add_argument("--classes", type=int, default=5, help="synthetic classes K <= 20, as K sparse COCO ids (default 5)")
    p.add_argument("--seed", type=int, default=0)
    add_scene_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a tree made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    syn = SimpleNamespace(train=args.train, val=args.val, test=0, size=tuple(args.size), classes=args.classes,
                          seed=args.seed, colours=args.colours, colour_jitter=args.colour_jitter,
                          object_scale=tuple(args.object_scale), max_objects=args.max_objects,
                          size_jitter=args.size_jitter)
    start = time.perf_counter()
    try:
        s = make_synthetic_coco_from_config(args.out, syn, overwrite=args.overwrite, progress=not args.quiet)
    except (FileExistsError, ValueError, CocoPrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = []
    for split, c in s["splits"].items():
        parts.append(f"{split}2014 {c['images']} images / {c['annotations']} annotations "
                     f"({c['polygon']} polygon, {c['rle']} RLE, {c['crowd']} crowd)")
    print(f"synthetic COCO at {args.out}: {'; '.join(parts)}; categories {s['category_ids']} "
          f"= labels {s['label_ids']}; {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the synthetic VOC-format data set (see datasets/synthetic/voc.py).

    python tools/make_synthetic_voc.py --out data [--train 200 --val 50 --test 20
        --size 96 128 --classes 5 --seed 0 --overwrite]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.synthetic.voc import make_synthetic_voc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help=f"data root to write (VOC2012/, {PSEUDO_LABEL_DIR}/, {MASK_DIR}/)")
    p.add_argument("--train", type=int, default=200, help="train_aug images (default 200)")
    p.add_argument("--val", type=int, default=50, help="val images (default 50)")
    p.add_argument("--test", type=int, default=20, help="test images, no labels (default 20)")
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"), help="image size (default 96 128)")
    p.add_argument("--classes", type=int, default=5, help="foreground classes K <= 20 (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--void-width", type=int, default=2, help="void band width in px (default 2)")
    p.add_argument("--size-jitter", type=float, default=0.0, help="per-image size factor range 1 +- j (default 0)")
    p.add_argument("--label-noise", type=float, default=1.0, help="scale of the pseudo-label errors (default 1)")
    add_scene_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a set made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def add_scene_options(p: argparse.ArgumentParser) -> None:
    """The options of the drawn scenes, shared with tools/make_synthetic_coco.py."""
    p.add_argument("--object-scale", type=float, nargs=2, default=(0.14, 0.3), metavar=("MIN", "MAX"),
                   help="object radius range as a fraction of the short side (default 0.14 0.3)")
    p.add_argument("--max-objects", type=int, default=4, help="at most this many objects per image (default 4)")
    p.add_argument("--colours", choices=("instance", "class"), default="instance",
                   help="instance: random colours per object (hard); class: a fixed hue per class (the demo)")
    p.add_argument("--colour-jitter", type=float, default=25.0, help="per-instance colour shift in class mode")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_synthetic_voc(
            args.out, train=args.train, val=args.val, test=args.test, size=tuple(args.size),
            classes=args.classes, seed=args.seed, void_width=args.void_width,
            size_jitter=args.size_jitter, label_noise=args.label_noise,
            colours=args.colours, colour_jitter=args.colour_jitter,
            object_scale=tuple(args.object_scale), max_objects=args.max_objects,
            overwrite=args.overwrite, progress=not args.quiet)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pl, mask, n = summary["pseudo_label"], summary["mask"], summary["counts"]
    print(f"synthetic VOC at {args.out}: {n['train_aug']} train_aug / {n['val']} val / {n['test']} test, "
          f"K={summary['settings']['classes']}; pseudo-label mIoU {100 * pl['miou']:.1f}% "
          f"(pixel acc {100 * pl['pixel_acc']:.1f}%); mask keeps {100 * mask['kept_fraction']:.1f}% "
          f"at precision {100 * mask['kept_precision']:.1f}%; {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

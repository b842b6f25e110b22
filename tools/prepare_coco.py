"""Prepare COCO 2014 for this project (first-stage spec §16.1; see datasets/prepare/coco.py).

    python tools/prepare_coco.py --coco data/coco [--splits train,val] [--workers N] [--overwrite]

Reads ``<coco>/annotations/instances_{train,val}2014.json`` and writes, under ``<coco>``:

    mask/{train,val}2014/<int image id>.png   GT by the reference's annToMask rule (uint8 L, 0..80)
    lists/{train,val}2014.txt                 file stems, ascending image id
    cls_labels_{train,val}2014.json           image-level labels (crowd annotations included)
    prepare_coco.json                         the counts printed below

Masks that already exist are kept (a rerun after a kill resumes) unless ``--overwrite``,
or unless the annotation file changed since they were written. Every file is written
atomically. Exit status 2 names the bad file on any input error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from datasets.coco import SPLITS, split_folder
from datasets.prepare.coco import SUMMARY_NAME, CocoPrepareError, default_workers, prepare_coco


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", type=Path, required=True,
                   help="COCO root with annotations/ and train2014/, val2014/")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated, of train,val (default both)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"mask-writing processes (default: all available cores, here {default_workers()})")
    p.add_argument("--overwrite", action="store_true", help="rewrite masks that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:  # a usage error (exit 2); a missing or bad annotation file is a data error (exit 1)
        print(f"error: unknown COCO split '{unknown[0]}'; expected some of {SPLITS}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        summary = prepare_coco(args.coco, splits, workers=args.workers, overwrite=args.overwrite,
                               progress=not args.quiet)
    except CocoPrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for s in splits:
        c = summary["splits"][s]
        stale = (" (annotation file changed: all rewritten)" if c["stale_masks_rewritten"]
                 else " (up to date)" if c.get("up_to_date") else "")
        print(f"{split_folder(s)}: {c['images']} images, {c['annotations']} annotations "
              f"({c['crowd_annotations']} crowd), {c['images_without_annotations']} images without annotations; "
              f"masks {c['masks_written']} written / {c['masks_kept']} kept{stale} -> {c['mask_dir']}, "
              f"{c['list']}, {c['cls_labels']}")
    print(f"summary in {args.coco / SUMMARY_NAME} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

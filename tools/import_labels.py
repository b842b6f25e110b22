"""Import pseudo-labels from any first stage into the second stage's layout (docs/pseudo-labels.md).

    python tools/import_labels.py --dataset voc --split train_aug --format png255 \\
        --labels /data/clip_es/labels --producer "CLIP-ES" \\
        data.pseudo_label_dir=clip_es_label data.mask_dir=clip_es_mask

Reads the split's ids and images through the data-set table, checks every id's files (stops
before writing, naming the files), then writes ``<data.root>/<data.pseudo_label_dir>/<id>.png``
(grey-index labels), ``<data.root>/<data.mask_dir>/<id>.png`` (confidence masks),
``label_manifest.json`` and, where ground truth exists, ``label_quality.md`` / ``.json``.
Train with the same ``data.pseudo_label_dir`` / ``data.mask_dir`` overrides.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from datasets.build import dataset_entry
from datasets.label_import import (DEFAULT_BOUNDARY_WIDTH, DEFAULT_SCORE_THRESHOLD, FORMATS, MANIFEST_NAME,
                                   QUALITY_MD, RULES, Source, Target, import_labels)
from engine.config import load_config
from utils.errors import ConfigError, exit_status

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="the producer's data set (a name of datasets/build.py's table)")
    p.add_argument("--split", default=None, help="the split the labels cover (default: the data set's training split)")
    p.add_argument("--config", default=None, help="config file (default: configs/beco_<dataset>.yaml)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="ours: label + mask folders; png255: 255 = uncertain; labels: label-only; "
                        "scores: labels + per-class score maps")
    p.add_argument("--labels", required=True, type=Path, help="folder of <id>.png labels (grey-index or VOC palette)")
    p.add_argument("--masks", type=Path, help="format ours: folder of <id>.png confidence masks")
    p.add_argument("--scores", type=Path, help="format scores: folder of <id>.npy / <id>.npz (C, H, W) score maps")
    p.add_argument("--score-key", default=None, help="the array's key in each .npz (default: its only array)")
    p.add_argument("--rule", choices=RULES, default=None,
                   help="confidence rule (default: the format's first: " +
                        ", ".join(f"{f} -> {r[0]}" for f, r in FORMATS.items()) + ")")
    p.add_argument("--boundary-width", type=int, default=DEFAULT_BOUNDARY_WIDTH,
                   help="rule boundary: pixels within this distance of another label are unreliable "
                        "(default %(default)s)")
    p.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                   help="rule top-probability: reliable where the top score >= this (default %(default)s)")
    p.add_argument("--producer", required=True, help="who made the labels, recorded in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import in the output folders")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default %(default)s)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (data.root, data.pseudo_label_dir, "
                                                "data.mask_dir, ...)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    try:
        entry = dataset_entry(args.dataset)
    except KeyError as e:
        raise ConfigError(f"--dataset: {e.args[0]}") from None
    config = Path(args.config) if args.config else REPO / "configs" / f"beco_{args.dataset}.yaml"
    cfg = load_config(config, args.overrides)
    d = cfg.data
    if d.dataset != args.dataset:
        raise ConfigError(f"--dataset {args.dataset} but {config} is a {d.dataset} config")
    split = args.split or entry.train_split(d)
    files = entry.files(d, split)
    source = Source(args.format, args.labels, masks=args.masks, scores=args.scores, score_key=args.score_key,
                    rule=args.rule, boundary_width=args.boundary_width, score_threshold=args.score_threshold)
    target = Target(Path(d.root), d.pseudo_label_dir, d.mask_dir)
    manifest = import_labels(source, files, target, dataset=args.dataset, split=split, num_classes=d.num_classes,
                             class_names=entry.class_names(d.num_classes), gt_ignore=entry.gt_ignore_index,
                             producer=args.producer, overwrite=args.overwrite, jobs=args.jobs,
                             progress=lambda it, desc: tqdm(it, total=len(files.ids), desc=desc, leave=False,
                                                           disable=None))  # no bar off a terminal
    c = manifest["counts"]
    print(f"imported {c['ids']} ids of {args.dataset} {split} ({args.format}, rule {manifest['rule']['name']}): "
          f"kept share {manifest['kept_share']:.3f}")
    print(f"labels: {target.labels}  masks: {target.masks}")
    print(f"manifest: {target.labels / MANIFEST_NAME}  quality: {target.labels / QUALITY_MD}")
    print(f"train on them with: data.pseudo_label_dir={d.pseudo_label_dir} data.mask_dir={d.mask_dir}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args), "import_labels: error")


if __name__ == "__main__":
    sys.exit(main())

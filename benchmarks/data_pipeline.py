"""Training data pipeline speed: images/s of the training DataLoader, per worker count.

    python benchmarks/data_pipeline.py                         # demo.yaml: 96x128 images, 96 crops, batch 8
    python benchmarks/data_pipeline.py --workers 0 1 2 4 --batches 40
    python benchmarks/data_pipeline.py data.crop_size=512 --size 375 500   # VOC-sized images and crops
    python benchmarks/data_pipeline.py --json                  # also one JSON line at the end (benchmarks/run_all.py)

The synthetic VOC-format set of the config's ``data.synthetic`` section is generated (as
engine.build.ensure_data does, through the data-set table's ``make_synthetic``) under
``--root`` (default: a temporary folder, removed afterwards) with ``--train`` training
images, then the training set and loader are built by engine.build's ``train_loader``, as
a training run's ``build_loaders`` builds them for one process on the CPU:
``TrainSet`` (read JPEG image + PNG pseudo-label + PNG mask, random resized crop, flip,
normalise), the seeded epoch sampler, ``drop_last``, ``seed_worker_fn``, no persistent
workers. The first batch of each loader (worker start-up, prefetch) is timed apart; the
figure is the steady state over the next ``--batches`` batches, with no network
consuming them, so it is the most the loader can feed. The one-off pre-flight file check
(``data.verify``) is not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datasets.build import dataset_entry
from datasets.segmentation import TrainSet
from engine.build import train_loader
from engine.config import load_config
from utils.config import Config
from utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]


def make_data(cfg: Config, root: Path, train: int, size: list[int] | None) -> Config:
    """Generate the config's synthetic set under ``root`` with ``train`` training images (the
    loader reads only those; val and test get the generator's minimum) and return the config
    pointing at it."""
    syn = cfg.data.synthetic
    if syn is None:
        raise SystemExit(f"error: the config has no data.synthetic section to generate ({cfg.data.dataset})")
    syn = dataclasses.replace(syn, train=train, val=1, test=0, size=list(size) if size else syn.size)
    data = dataclasses.replace(cfg.data, root=str(root), synthetic=syn)
    dataset_entry(data.dataset).make_synthetic(root, syn)
    return dataclasses.replace(cfg, data=data)


def loader_with(cfg: Config, workers: int) -> DataLoader:
    """The training loader of one process (rank 0 of 1) on the CPU, with ``workers`` workers."""
    train_set = TrainSet(cfg.data)
    if len(train_set) < cfg.data.batch_size:
        raise SystemExit(f"error: {len(train_set)} training images < batch size {cfg.data.batch_size}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    return train_loader(train_set, cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def time_loader(loader: DataLoader, batches: int) -> dict:
    """Seconds to the first batch, then images/s over ``batches`` more; epochs restart as in training."""
    epoch, seen, images = 0, 0, 0
    t0 = t1 = time.perf_counter()
    first = None
    while seen < batches + 1:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if first is None:
                first = time.perf_counter() - t0
                t1 = time.perf_counter()
            else:
                images += batch["image"].shape[0]
            seen += 1
            if seen == batches + 1:
                break
        epoch += 1
    seconds = time.perf_counter() - t1
    return {"first_batch_s": first, "images": images, "seconds": seconds, "img_s": images / seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"), help="config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.crop_size=512")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="DataLoader num_workers values to time (default: %(default)s)")
    p.add_argument("--batches", type=int, default=50, help="timed batches per worker count (default: %(default)s)")
    p.add_argument("--train", type=int, default=200, help="training images to generate (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="generated image size (default: the config's data.synthetic.size)")
    p.add_argument("--root", default=None, help="where to generate the set (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="end with one line holding the results as JSON")
    args = p.parse_intermixed_args(argv)

    cfg = load_config(args.config, args.overrides)
    tmp = None if args.root else Path(tempfile.mkdtemp(prefix="data_pipeline_bench_"))
    try:
        t0 = time.perf_counter()
        cfg = make_data(cfg, Path(args.root) if args.root else tmp, args.train, args.size)
        made = time.perf_counter() - t0
        syn = cfg.data.synthetic
        print(f"{args.train} synthetic {syn.size[0]}x{syn.size[1]} training images under {cfg.data.root} "
              f"({made:.1f} s to make or find); crop {cfg.data.crop_size}, batch {cfg.data.batch_size}, "
              f"scale_mode {cfg.data.scale_mode}; torch {torch.__version__}", flush=True)
        print(f"{'workers':>7}{'first batch s':>15}{'img/s':>9}{'img/s per worker':>18}")
        rows = []
        for w in args.workers:
            r = time_loader(loader_with(cfg, w), args.batches)
            # num_workers 0 loads in the training process itself: one worker's worth.
            r.update(workers=w, img_s_per_worker=r["img_s"] / max(w, 1))
            rows.append(r)
            print(f"{w:>7}{r['first_batch_s']:>15.3f}{r['img_s']:>9.1f}{r['img_s_per_worker']:>18.1f}", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"config": str(args.config), "overrides": args.overrides, "train_images": args.train,
              "image_size": list(syn.size), "crop_size": cfg.data.crop_size, "batch_size": cfg.data.batch_size,
              "batches": args.batches, "rows": rows}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Test-pass speed (main.py --test): val images/s of the two nets' averaged maps, single-scale
vs multi-scale + flip, by batch size, and of the whole per-batch test loop.

    python benchmarks/eval_speed.py                        # demo.yaml (2 x DeepLabV3+ R18), 96x96 inputs, CPU
    python benchmarks/eval_speed.py --batch 1 4 16 --images 32
    python benchmarks/eval_speed.py --config configs/demo_segformer.yaml --threads 1
    python benchmarks/eval_speed.py --json                 # also one JSON line at the end (benchmarks/run_all.py)

The config's synthetic val images (``--images`` of them, generated under ``--root``,
default a temporary folder) are read once through main.py --test's ``EvalSet`` (resize to
``data.val_size``, normalise; timed as the ``loading`` figure) and kept in memory, so the
other figures exclude loading. The nets are the test pass's own (``build_test_nets``:
the method's nets, ``pretrained=False``, eval mode) with random weights: speed does not
depend on the weights. Per batch size, after one warm-up batch:

- ``single``: ``engine.inference.predict_maps`` with test.multi_scale and test.flip off:
  one forward per net, averaged (``engine.evaluate.average_outputs``);
- ``msc_flip``: the same with both on, over ``test.scales``: per net 2 x (1 + len(scales))
  forwards (each scale's input resized, its map resized back, pixel-wise max, flip averaged);
- ``test_loop``: run_test's per-batch work (``score_batch``), single-scale: ``predict_maps``, the maps to
  host memory, one ``save_score_map`` per image (``test.logits_format`` / ``logits_dtype``,
  into a temporary folder), the rounded maps back, the confusion matrix at val_size and the
  per-image one at the original resolution.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from torch.utils.data import DataLoader

from datasets.build import dataset_entry
from datasets.segmentation import EvalSet, collate_eval
from engine.inference import _full_resolution_confusion, build_test_nets, predict_maps
from engine.config import load_config
from utils.config import Config
from utils.crf import REST_FLOOR
from utils.metrics import confusion_matrix
from utils.runtime import keep_host_memory, make_autocast
from utils.score_maps import SUFFIX, save_score_map, to_dense

REPO = Path(__file__).resolve().parents[1]


def make_val_set(cfg: Config, root: Path, images: int) -> Config:
    """Generate the config's synthetic set with ``images`` val images under ``root`` (the
    training split gets the generator's minimum); the config pointing at it, testing 'val'."""
    syn = cfg.data.synthetic
    if syn is None:
        raise SystemExit(f"error: the config has no data.synthetic section to generate ({cfg.data.dataset})")
    syn = dataclasses.replace(syn, train=1, val=images, test=0)
    data = dataclasses.replace(cfg.data, root=str(root), synthetic=syn)
    dataset_entry(data.dataset).make_synthetic(root, syn)
    return dataclasses.replace(cfg, data=data, test=dataclasses.replace(cfg.test, split="val"))


def load_batches(cfg: Config, batch: int) -> tuple[list[dict], float]:
    """The val split as run_test batches it (labels at val_size and at the original size), and
    the seconds reading them took."""
    dataset = EvalSet(cfg.data, cfg.test.split, with_labels=True, full_labels=True)
    t0 = time.perf_counter()
    batches = list(DataLoader(dataset, batch_size=batch, collate_fn=collate_eval, num_workers=0))
    return batches, time.perf_counter() - t0


def with_test(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, test=dataclasses.replace(cfg.test, **changes))


def test_loop_step(nets: list, batch: dict, cfg: Config, out_dir: Path, autocast) -> None:
    """engine.inference.score_batch's work for one batch of ids whose maps are not saved yet."""
    num_classes, align = cfg.data.num_classes, cfg.model.align_corners
    images = batch["image"]
    with autocast():
        pre, full = predict_maps(nets, images, cfg)
    stored = pre.float()
    paths = [out_dir / f"{i}{SUFFIX[cfg.test.logits_format]}" for i in batch["id"]]
    written = [save_score_map(path, arr, cfg.test.logits_format, cfg.test.logits_dtype, cfg.test.compact_threshold,
                              cfg.test.compact_max_classes) for path, arr in zip(paths, stored.cpu().numpy())]
    stored = torch.from_numpy(np.stack([to_dense(m, REST_FLOOR) for m in written]))
    confusion_matrix(full.argmax(1), batch["label"], num_classes)
    _full_resolution_confusion(stored, batch["full_label"], num_classes, align)


def images_per_second(fn, batches: list[dict]) -> float:
    fn(batches[0])  # warm-up: allocator, kernel choice
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b["id"]) for b in batches) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"), help="config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.val_size=512")
    p.add_argument("--images", type=int, default=24, help="val images to generate and time (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                   help="batch sizes to time; 1 is main.py --test's data.val_batch_size (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=["single", "msc_flip", "test_loop"],
                   choices=["single", "msc_flip", "test_loop"], help="what to time (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--root", default=None, help="where to generate the set (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="end with one line holding the results as JSON")
    args = p.parse_intermixed_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    keep_host_memory(cfg.train.keep_host_memory)  # as run_test does
    device = torch.device("cpu")
    torch.manual_seed(0)
    nets = build_test_nets(cfg, device)
    autocast = make_autocast(cfg, device)
    variants = {
        "single": with_test(cfg, multi_scale=False, flip=False),
        "msc_flip": with_test(cfg, multi_scale=True, flip=True),
        "test_loop": with_test(cfg, multi_scale=False, flip=False),
    }
    tmp = Path(tempfile.mkdtemp(prefix="eval_speed_bench_"))
    rows = []
    try:
        cfg = make_val_set(cfg, Path(args.root) if args.root else tmp / "data", args.images)
        maps_dir = tmp / "maps"
        maps_dir.mkdir()
        print(f"{args.images} synthetic val images at {cfg.data.val_size}x{cfg.data.val_size}, {len(nets)} x "
              f"{cfg.model.name} ({cfg.data.num_classes} classes), scales {cfg.test.scales}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
        print(f"{'variant':<12}{'batch':>6}{'img/s':>9}{'s/image':>9}")
        for batch in args.batch:
            batches, seconds = load_batches(cfg, batch)
            if batch == args.batch[0]:
                rows.append({"variant": "loading", "batch": batch, "img_s": args.images / seconds})
                print(f"{'loading':<12}{batch:>6}{rows[-1]['img_s']:>9.1f}{1 / rows[-1]['img_s']:>9.4f}", flush=True)
            for name in args.variants:
                vcfg = dataclasses.replace(variants[name], data=cfg.data)
                if name == "test_loop":
                    def fn(b, c=vcfg):
                        test_loop_step(nets, b, c, maps_dir, autocast)
                else:
                    def fn(b, c=vcfg):
                        with autocast():
                            predict_maps(nets, b["image"], c)
                rate = images_per_second(fn, batches)
                rows.append({"variant": name, "batch": batch, "img_s": rate})
                print(f"{name:<12}{batch:>6}{rate:>9.1f}{1 / rate:>9.4f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"config": str(args.config), "overrides": args.overrides, "images": args.images,
              "val_size": cfg.data.val_size, "nets": len(nets), "model": cfg.model.name,
              "scales": list(cfg.test.scales), "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

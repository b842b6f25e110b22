"""Dense-CRF post-processing speed: images/s on 1 core and on all cores, full vs label-pruned CRF,
and whether the two give identical predictions.

    python benchmarks/crf.py                                  # VOC-sized synthetic inputs (375x500, 21 classes)
    python benchmarks/crf.py --images 32 --jobs 1 4 16
    python benchmarks/crf.py --logits_dir data/logging/<run>/logits   # maps saved by main.py --test
    python benchmarks/crf.py --from-config configs/demo.yaml --images 50  # the synthetic val set

Timed work per image is test.py's: upsample the stride-4 map to the image size, softmax,
dense CRF, argmax (no file I/O). Workers are single-threaded processes fed in chunks, as
in test.py. The synthetic inputs are images of the synthetic VOC generator with score
maps made from their ground truth: smoothed one-hot class scores plus low-frequency
noise, absent classes pushed down, at stride 4 (what the network saves).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads: one thread per process

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from datasets.build import dataset_entry  # noqa: E402
from engine.config import load_config  # noqa: E402
from utils.crf import (REST_FLOOR, available_cores, crf_image, crf_predict, kept_labels, parallel_map,  # noqa: E402
                       softmax, upsample_bilinear)
from utils.score_maps import SUFFIX, load_score_map, to_dense  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

_INPUTS: list[tuple[np.ndarray, np.ndarray]] = []  # (stride-4 logits, RGB image) of this process
_SETTINGS: dict = {}


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Unit-variance noise that varies over ``cell`` pixels (bilinear upsampling of a coarse grid)."""
    coarse = rng.standard_normal((1, shape[0] // cell + 2, shape[1] // cell + 2)).astype(np.float32)
    return upsample_bilinear(coarse, shape, align_corners=True)[0] / 0.6  # bilinear blending shrinks the std


def fake_logits(gt: np.ndarray, num_classes: int, stride: int, rng: np.random.Generator, scale: float,
                blur: float, noise: float, noise_cell: int, absent_offset: float) -> np.ndarray:
    """A (C, H/stride, W/stride) score map that behaves like a network's: confident inside
    regions, soft across boundaries, noisy, with absent classes well below the present ones."""
    import cv2
    h, w = gt.shape
    labels = np.where(gt == 255, 0, gt)  # void outlines count as background here
    onehot = np.stack([(labels == k).astype(np.float32) for k in range(num_classes)])
    ksize = int(4 * blur) | 1
    soft = np.stack([cv2.GaussianBlur(m, (ksize, ksize), blur) for m in onehot])
    small = (max(1, h // stride), max(1, w // stride))
    soft = np.stack([cv2.resize(m, (small[1], small[0]), interpolation=cv2.INTER_AREA) for m in soft])
    present = np.isin(np.arange(num_classes), np.unique(labels))
    out = scale * soft - absent_offset * (~present)[:, None, None].astype(np.float32)
    for k in range(num_classes):
        out[k] += noise * smooth_noise(rng, small, noise_cell)
    return out.astype(np.float32)


def synthetic_inputs(args: argparse.Namespace) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    from PIL import Image

    # imported here: the generators load torch and OpenCV, which only this input mode needs
    from datasets.synthetic.voc import make_synthetic_voc, synthetic_ids
    if not args.data:  # a temporary set, removed once its images are read
        with tempfile.TemporaryDirectory(prefix="crf_bench_") as tmp:
            args = argparse.Namespace(**{**vars(args), "data": tmp})
            return synthetic_inputs(args)
    root = Path(args.data)
    make_synthetic_voc(root, train=1, val=args.images, test=0, size=tuple(args.size), classes=args.classes - 1,
                       seed=args.seed)
    rng = np.random.default_rng(args.seed)
    inputs = []
    for i in synthetic_ids(1, args.images, 0)["val"]:
        image = np.asarray(Image.open(root / "VOC2012/JPEGImages" / f"{i}.jpg").convert("RGB"))
        gt = np.asarray(Image.open(root / "VOC2012/SegmentationClass" / f"{i}.png"))
        inputs.append((fake_logits(gt, args.classes, 4, rng, args.logit_scale, args.blur, args.noise,
                                   args.noise_cell, args.absent_offset), image))
    return inputs, False


def dataset_inputs(args: argparse.Namespace) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    """Images of a config's data set (its test.split), maps made from their ground truth."""
    from PIL import Image

    cfg = load_config(args.from_config)
    files = dataset_entry(cfg.data.dataset).files(cfg.data, cfg.test.split)
    rng = np.random.default_rng(args.seed)
    inputs = []
    for i in files.ids[: args.images]:
        image = np.asarray(Image.open(files.image(i)).convert("RGB"))
        gt = np.asarray(Image.open(files.gt(i)))
        inputs.append((fake_logits(gt, cfg.data.num_classes, 4, rng, args.logit_scale, args.blur, args.noise,
                                   args.noise_cell, args.absent_offset), image))
    return inputs, cfg.model.align_corners


def saved_inputs(args: argparse.Namespace) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    from PIL import Image

    logits_dir = Path(args.logits_dir)
    cfg = load_config(args.config or logits_dir.resolve().parent / "config.yaml")
    files = dataset_entry(cfg.data.dataset).files(cfg.data, cfg.test.split)
    suffix = SUFFIX[cfg.test.logits_format]
    inputs = [(to_dense(load_score_map(logits_dir / f"{i}{suffix}", i, cfg.data.num_classes), REST_FLOOR),
               np.asarray(Image.open(files.image(i)).convert("RGB"))) for i in files.ids[: args.images]]
    return inputs, cfg.model.align_corners


def _share(inputs: list, settings: dict) -> None:
    _INPUTS[:] = inputs
    _SETTINGS.update(settings)


def _predict(index: int) -> tuple[int, np.ndarray, int]:
    """(index, CRF label map, number of labels the CRF ran over)."""
    logits, image = _INPUTS[index]
    crf, prune, align = _SETTINGS["crf"], _SETTINGS["prune"], _SETTINGS["align_corners"]
    prob = softmax(upsample_bilinear(logits, image.shape[:2], align), axis=0)
    rgb = crf_image(image, crf.legacy_image, crf.legacy_mean)
    pred = crf_predict(prob, rgb, crf, prune).astype(np.uint8)
    if prune:
        used = len(kept_labels(prob, crf.prune_threshold))
    else:
        used = prob.shape[0]
    return index, pred, used


def timed_run(inputs: list, crf, prune: bool, align: bool, jobs: int, chunk: int
              ) -> tuple[float, list[np.ndarray], float]:
    settings = {"crf": crf, "prune": prune, "align_corners": align}
    _share(inputs, settings)  # for jobs == 1; worker processes get them through the initializer
    preds: list = [None] * len(inputs)
    used = []
    t0 = time.perf_counter()
    for index, pred, n in parallel_map(_predict, range(len(inputs)), jobs, chunk, init=_share,
                                       init_args=(inputs, settings)):
        preds[index] = pred
        used.append(n)
    return time.perf_counter() - t0, preds, float(np.mean(used))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"),
                   help="synthetic image size (default: VOC's typical 375 500)")
    p.add_argument("--classes", type=int, default=21, help="classes incl. background (default: %(default)s)")
    p.add_argument("--jobs", type=int, nargs="+", default=None,
                   help="worker counts to time (default: 1 and all available cores)")
    p.add_argument("--config", default=None, help="CRF parameters: test.crf of this config "
                   "(default: configs/beco_voc.yaml, or the run's config with --logits_dir)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="prune thresholds to compare with the full CRF (default: the config's)")
    p.add_argument("--logits_dir", default=None, help="time saved maps of a run instead of synthetic ones")
    p.add_argument("--from-config", default=None,
                   help="time the images of this config's data set (test.split), maps made from their ground truth")
    p.add_argument("--data", default=None, help="where to generate the synthetic images (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-scale", type=float, default=8.0, help="synthetic maps: score of the true class")
    p.add_argument("--blur", type=float, default=6.0, help="synthetic maps: boundary softness (px, full size)")
    p.add_argument("--noise", type=float, default=1.0, help="synthetic maps: std of the score noise")
    p.add_argument("--noise-cell", type=int, default=8, help="synthetic maps: noise correlation length (stride-4 px)")
    p.add_argument("--absent-offset", type=float, default=8.0, help="synthetic maps: push-down of absent classes")
    args = p.parse_args(argv)

    if args.logits_dir:
        inputs, align = saved_inputs(args)
        cfg = load_config(args.config or Path(args.logits_dir).resolve().parent / "config.yaml")
        source = f"saved maps {args.logits_dir}"
    elif args.from_config:
        inputs, align = dataset_inputs(args)
        cfg = load_config(args.config or args.from_config)
        source = f"{args.from_config} images, maps from their ground truth"
    else:
        cfg = load_config(args.config or REPO / "configs/beco_voc.yaml")
        inputs, align = synthetic_inputs(args)
        source = f"synthetic {args.size[0]}x{args.size[1]} images, {args.classes} classes"
    crf = cfg.test.crf
    cores = available_cores()
    jobs = args.jobs or sorted({1, cores})
    thresholds = args.thresholds or [crf.prune_threshold]
    h, w = inputs[0][1].shape[:2]
    print(f"{len(inputs)} inputs: {source} (first {w}x{h}, {inputs[0][0].shape[0]} classes) | "
          f"{cores} cores available | CRF {crf.iterations} iterations, chunk {cfg.test.chunk_size}")

    print(f"{'variant':<24}{'jobs':>5}{'images/s':>10}{'s/image':>9}{'labels':>8}  same as full")
    full_preds = None
    for name, prune, thr in [("full", False, None)] + [(f"pruned p>={t:g}", True, t) for t in thresholds]:
        variant = dataclasses.replace(crf, prune_threshold=thr) if thr is not None else crf
        for n in jobs:
            seconds, preds, used = timed_run(inputs, variant, prune, align, n, cfg.test.chunk_size)
            if full_preds is None:
                full_preds = preds
            diff_images = sum(not np.array_equal(a, b) for a, b in zip(preds, full_preds))
            diff_pixels = sum(int((a != b).sum()) for a, b in zip(preds, full_preds))
            same = "yes" if diff_images == 0 else f"NO: {diff_images} images, {diff_pixels} pixels differ"
            print(f"{name:<24}{n:>5}{len(inputs) / seconds:>10.2f}{seconds * n / len(inputs):>9.2f}"
                  f"{used:>8.1f}  {same}", flush=True)
    print("s/image = core-seconds per image (wall time x jobs / images); labels = mean labels the CRF ran over")
    return 0


if __name__ == "__main__":
    sys.exit(main())

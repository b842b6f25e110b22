"""COCO evaluation paths: time per image and disk per image of each, extrapolated to val2014.

    python benchmarks/coco_eval.py                     # 8 synthetic COCO images of 480x640, 81 classes
    python benchmarks/coco_eval.py --images 16 --full-crf 2

Measured per image on one core (test.py's workers are single-threaded processes, so n cores
do n images at a time): writing the score map (dense float32, dense float16, compact
float16), test.py without CRF (upsample, softmax, arg-max) from each, and the dense CRF
(pruned labels, the default; and over all 81 labels for ``--full-crf`` images). The maps
are made from the ground truth like benchmarks/crf.py's (confident inside regions, soft at
boundaries, absent classes pushed down), at stride 4 of the 512x512 test input: 128x128.
Also checks that compact maps give the dense maps' labels. The networks' own test pass is
not timed here (benchmarks/train_step.py times the nets; on a GPU see benchmarks/gpu.sh).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads: one thread, as in test.py's workers

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from benchmarks.crf import fake_logits  # noqa: E402
from engine.config import load_config  # noqa: E402
from utils.crf import postprocess  # noqa: E402
from utils.score_maps import load_score_map, save_score_map  # noqa: E402

VAL2014 = 40_504
FORMATS = (("dense", "float32"), ("dense", "float16"), ("compact", "float16"), ("compact", "float32"))


def coco_inputs(root: Path, n: int, size: tuple[int, int], seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, RGB image, ground truth) of ``n`` synthetic COCO val images, prepared as for a run."""
    from PIL import Image

    # imported here: the generators load torch and OpenCV, which only this input mode needs
    from datasets.coco import coco_files
    from datasets.prepare.coco import prepare_coco
    from datasets.synthetic.coco import make_synthetic_coco
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # pycocotools under numpy 2
    make_synthetic_coco(root, train=3, val=n, size=size, classes=12, seed=seed, max_objects=5, size_jitter=0.2)
    prepare_coco(root, ("val",), workers=1, progress=False)
    files = coco_files(root, "val", "lists")
    return [(i, np.asarray(Image.open(files.image(i)).convert("RGB")), np.asarray(Image.open(files.gt(i))))
            for i in files.ids]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                   help="image size (COCO's typical 480 640)")
    p.add_argument("--map-size", type=int, default=128, help="score-map side (stride 4 of the 512 test input)")
    p.add_argument("--full-crf", type=int, default=1, help="images also run through the CRF over all 81 labels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    cfg = load_config(REPO / "configs/beco_coco.yaml")
    crf, test = cfg.test.crf, cfg.test
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = coco_inputs(tmp / "coco", args.images, tuple(args.size), args.seed)
        import cv2
        rows: dict[str, list[float]] = {}
        sizes: dict[str, list[int]] = {}
        kept: list[int] = []
        same = {"no CRF": 0, "CRF": 0}
        differ = {"no CRF": 0, "CRF": 0}  # pixels
        capped = 0  # images where a dropped class reached the CRF's prune threshold
        for item_id, image, gt in inputs:
            square = cv2.resize(gt, (512, 512), interpolation=cv2.INTER_NEAREST)
            logits = fake_logits(square, 81, 512 // args.map_size, rng, 8.0, 6.0, 1.0, 8, 8.0)
            labels = {}
            for fmt, dtype in FORMATS:
                name = f"{fmt} {dtype}"
                path = tmp / f"{item_id}.{fmt}.{dtype}{'.npy' if fmt == 'dense' else '.npz'}"
                t0 = time.perf_counter()
                save_score_map(path, logits, fmt, dtype, test.compact_threshold, test.compact_max_classes)
                rows.setdefault(f"save: {name}", []).append(time.perf_counter() - t0)
                sizes.setdefault(name, []).append(path.stat().st_size)
                t0 = time.perf_counter()
                score = load_score_map(path, item_id, 81)
                pred, _ = postprocess(score, image, None, cfg.model.align_corners)
                rows.setdefault(f"test.py no CRF: {name}", []).append(time.perf_counter() - t0)
                labels[name] = (score, pred)
                if fmt == "compact" and dtype == "float16":
                    kept.append(len(score.classes))
            for name in ("dense float32", "compact float16"):
                t0 = time.perf_counter()
                _, pred_crf = postprocess(labels[name][0], image, crf, cfg.model.align_corners, prune=True)
                rows.setdefault(f"test.py CRF pruned: {name}", []).append(time.perf_counter() - t0)
                labels[name] = (*labels[name], pred_crf)
            for k, col in (("no CRF", 1), ("CRF", 2)):
                mismatch = int((labels["dense float32"][col] != labels["compact float16"][col]).sum())
                same[k] += mismatch == 0
                differ[k] += mismatch
            capped += labels["compact float16"][0].dropped_peak >= crf.prune_threshold
        for item_id, image, _ in inputs[: args.full_crf]:
            score = load_score_map(tmp / f"{item_id}.dense.float32.npy", item_id, 81)
            t0 = time.perf_counter()
            postprocess(score, image, crf, cfg.model.align_corners, prune=False)
            rows.setdefault("test.py CRF over all 81 labels: dense float32", []).append(time.perf_counter() - t0)

    h, w = inputs[0][1].shape[:2]
    print(f"{len(inputs)} synthetic COCO val images (first {w}x{h}), 81 classes, maps {args.map_size}x{args.map_size}; "
          f"one core; extrapolated to val2014's {VAL2014:,} images")
    pixels = sum(image.shape[0] * image.shape[1] for _, image, _ in inputs)
    print(f"compact float16 maps keep {np.mean(kept):.1f} classes on average (max {max(kept)}; on {capped} images the "
          f"cap dropped a class reaching the CRF's threshold); labels equal to dense float32 on "
          f"{same['no CRF']}/{len(inputs)} images without CRF ({differ['no CRF']} of {pixels:,} pixels differ), "
          f"{same['CRF']}/{len(inputs)} with CRF ({differ['CRF']} differ)")
    print(f"\n{'path':<50}{'s/image':>9}{'h, 1 core':>11}{'h, 16 cores':>13}")
    for name, times in rows.items():
        s = float(np.median(times))
        print(f"{name:<50}{s:>9.3f}{s * VAL2014 / 3600:>11.1f}{s * VAL2014 / 3600 / 16:>13.2f}")
    print(f"\n{'map format':<20}{'MB/image':>10}{'GB for val2014':>16}")
    for name, b in sizes.items():
        print(f"{name:<20}{np.mean(b) / 1e6:>10.3f}{np.mean(b) * VAL2014 / 1e9:>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

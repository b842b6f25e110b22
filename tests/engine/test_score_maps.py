"""Compact score maps (utils/score_maps.py): the bounded-disk path gives the labels of the
full-precision one, with and without CRF, on the synthetic COCO set."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from datasets.coco import NUM_CLASSES, coco_files
from datasets.synthetic.coco import make_synthetic_coco
from datasets.prepare.coco import prepare_coco
from engine.config import load_config
from utils.crf import postprocess
from utils.score_maps import (ScoreMapError, bytes_bound, compact, kept_classes, load_score_map,
                              save_score_map)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]


def _net_like_logits(gt: np.ndarray, rng: np.random.Generator, stride: int = 4) -> np.ndarray:
    """(81, h/4, w/4) logits as a segmenter gives them: the image's classes high where they
    are, smooth confusions between them, every other class far below with noise."""
    h, w = gt.shape[0] // stride, gt.shape[1] // stride
    small = cv2.resize(gt, (w, h), interpolation=cv2.INTER_NEAREST)
    field = np.stack([cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), 1.0)
                      for _ in range(NUM_CLASSES)])
    logits = (-9.0 + 2.0 * field).astype(np.float32)
    present = np.unique(gt)
    for c in present:
        region = cv2.GaussianBlur((small == c).astype(np.float32), (0, 0), 1.5)
        logits[c] = 6.0 * region + rng.normal(0.0, 0.8, (h, w))
    for c in rng.choice(NUM_CLASSES, 3, replace=False):  # a few plausible wrong classes
        logits[c] += rng.uniform(2.0, 6.0) * cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0)
    return logits


@pytest.fixture(scope="module")
def coco_val(tmp_path_factory) -> list[tuple[str, np.ndarray, np.ndarray]]:
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, train=3, val=12, size=(72, 96), classes=5, seed=4, size_jitter=0.2)
    prepare_coco(root, ("val",), workers=1, progress=False)
    files = coco_files(root, "val", "lists")
    return [(i, np.asarray(Image.open(files.image(i)).convert("RGB")), np.asarray(Image.open(files.gt(i))))
            for i in files.ids]


def test_compact_labels_equal_the_full_precision_labels(coco_val, tmp_path):
    crf = load_config(REPO / "configs/beco_coco.yaml").test.crf
    rng = np.random.default_rng(0)
    dense_bytes = compact_bytes = 0
    for item_id, image, gt in coco_val:
        logits = _net_like_logits(gt, rng)
        dense, packed = tmp_path / f"{item_id}.npy", tmp_path / f"{item_id}.npz"
        save_score_map(dense, logits, "dense", "float32", 1e-4, 12)
        save_score_map(packed, logits, "compact", "float16", 1e-4, 12)
        dense_bytes += dense.stat().st_size
        compact_bytes += packed.stat().st_size
        full = load_score_map(dense, item_id, NUM_CLASSES)
        small = load_score_map(packed, item_id, NUM_CLASSES)
        assert len(small.classes) < 12
        for prune in (True, False):  # pruned: the default CRF; unpruned: every one of the 81 labels
            ref, ref_crf = postprocess(full, image, crf, False, prune=prune)
            out, out_crf = postprocess(small, image, crf, False, prune=prune)
            assert np.array_equal(out, ref), item_id
            assert np.array_equal(out_crf, ref_crf), (item_id, prune, int((out_crf != ref_crf).sum()))
    assert compact_bytes * 5 < dense_bytes, (compact_bytes, dense_bytes)


def test_kept_classes_are_the_peaks_and_the_winners():
    logits = np.full((6, 2, 3), -20.0, np.float32)
    logits[0] = 5.0
    logits[3, 0, 0] = 4.5          # a peak of ~0.38: kept
    logits[5, 1, 2] = -2.0         # ~5e-4 below the winner: kept at 1e-4, dropped at 1e-3
    assert kept_classes(logits, 1e-4, 12).tolist() == [0, 3, 5]
    assert kept_classes(logits, 1e-3, 12).tolist() == [0, 3]
    assert kept_classes(logits, 1e-4, 1).tolist() == [0]  # the cap keeps the winner first
    record = compact(logits, 1e-4, 12)
    assert record["classes"].tolist() == [0, 3, 5] and record["logits"].dtype == np.float16
    # Stored relative to each pixel's top logit (5 here: class 0 wins everywhere); rest =
    # log-sum-exp of the dropped classes 1, 2, 4 = log(3) - 20, minus 5.
    assert np.allclose(record["rest"].astype(np.float32), np.log(3.0) - 25.0, atol=1e-2)
    assert np.array_equal(record["logits"][0], np.zeros((2, 3), np.float16))


def test_compact_map_errors_name_the_id(tmp_path):
    logits = np.zeros((81, 4, 4), np.float32)
    path = tmp_path / "COCO_val2014_000000000042.npz"
    save_score_map(path, logits, "compact", "float16", 1e-4, 12)
    with pytest.raises(ScoreMapError, match="'COCO_val2014_000000000042' was made for 81 classes, the data set has 21"):
        load_score_map(path, "COCO_val2014_000000000042", 21)
    with pytest.raises(ScoreMapError, match="score map missing for id 'x'"):
        load_score_map(tmp_path / "x.npz", "x", 81)


def test_disk_bound_of_coco_val_with_crf_is_under_20_gb():
    """40,504 val images at 128 x 128: dense float32 215 GB (oracle 8: 5,308,416 B each),
    float16 107 GB; compact (<= 12 classes + rest, float16) at most 17.3 GB."""
    assert bytes_bound(1, 81, 128, 128, "dense", "float32", 12) == 5_308_416
    assert round(bytes_bound(40_504, 81, 128, 128, "dense", "float32", 12) / 1e9, 1) == 215.0
    assert bytes_bound(40_504, 81, 128, 128, "compact", "float16", 12) < 20e9

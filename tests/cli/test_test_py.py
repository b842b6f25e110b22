"""test.py and utils/crf.py on tiny synthetic data: full-resolution mIoU against an independent
computation, dense CRF (edge alignment, label pruning, legacy image), VOC server layout,
pictures, bad input, resume."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.synthetic.voc import make_synthetic_voc
from tests.conftest import REPO
from utils import provenance
from engine.config import load_config
from utils.config import to_yaml
from utils.crf import crf_image, crf_predict, kept_labels, postprocess, softmax, upsample_bilinear
from utils.io import save_json
from utils.voc import voc_palette

pytestmark = pytest.mark.timeout(300)
NUM_CLASSES = 4
OVERRIDES = ["data.synthetic=null", f"data.num_classes={NUM_CLASSES}",
             "data.crop_size=64", "data.val_size=64", "data.num_workers=0"]


@pytest.fixture(scope="module")
def syn_root(synthetic_set) -> Path:
    return synthetic_set("voc", train=2, val=6, test=3, size=(64, 64), classes=NUM_CLASSES - 1, seed=1)


def _ids(root: Path, split: str) -> list[str]:
    return (root / "VOC2012/ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def _fake_map(gt: np.ndarray | None, rng: np.random.Generator, shape=(16, 16)) -> np.ndarray:
    """A stride-4 map like a network's: smoothed one-hot scores of the ground truth plus noise."""
    if gt is None:
        scores = torch.from_numpy(rng.normal(size=(1, NUM_CLASSES, *shape)).astype(np.float32)) * 3
    else:
        onehot = F.one_hot(torch.from_numpy(np.where(gt == 255, 0, gt).astype(np.int64)), NUM_CLASSES)
        soft = F.avg_pool2d(onehot.permute(2, 0, 1)[None].float(), 5, stride=1, padding=2)
        scores = F.interpolate(soft, size=shape, mode="area") * 6
    scores = scores + torch.from_numpy(rng.normal(scale=0.8, size=scores.shape).astype(np.float32))
    return scores[0].numpy()


def _make_run(root: Path, run: Path, split: str, seed: int = 0) -> Path:
    """A run folder as main.py --test leaves it: config.yaml and logits/<id>.npy."""
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={root}", f"test.split={split}", *OVERRIDES])
    (run / "logits").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    rng = np.random.default_rng(seed)
    for i in _ids(root, split):
        gt_path = root / "VOC2012/SegmentationClass" / f"{i}.png"
        gt = np.asarray(Image.open(gt_path)) if gt_path.is_file() else None
        np.save(run / "logits" / f"{i}.npy", _fake_map(gt, rng))
    return run / "logits"


@pytest.fixture(scope="module")
def cli():
    """test.py loaded as a module: runs in this process (an interpreter + torch start per call
    would dominate these tests); its forked workers inherit the module."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    spec = importlib.util.spec_from_file_location("beco_test_cli", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # workers unpickle their task function by module name
    spec.loader.exec_module(module)
    for k, v in saved.items():  # test.py pins these for its own process; give the test session its own back
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    yield module
    sys.modules.pop(spec.name, None)


def _run(cli, *args: str) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(args))
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def _test_py_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "test.py", *args], cwd=REPO, capture_output=True, text=True, env=env)


def _independent_miou(preds: dict[str, np.ndarray], gts: dict[str, np.ndarray]) -> tuple[float, list]:
    """Per-class IoU by counting pixel sets image by image; classes absent from the GT skipped, 255 ignored."""
    inter = np.zeros(NUM_CLASSES)
    union = np.zeros(NUM_CLASSES)
    in_gt = np.zeros(NUM_CLASSES)
    for i, gt in gts.items():
        valid = gt != 255
        for c in range(NUM_CLASSES):
            p, g = (preds[i] == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
            in_gt[c] += g.sum()
    ious = [inter[c] / union[c] if in_gt[c] else None for c in range(NUM_CLASSES)]
    return float(np.mean([v for v in ious if v is not None])), ious


# ----------------------------------------------------------------------------- utils/crf.py

@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_matches_torch_interpolate(align_corners):
    x = np.random.default_rng(0).normal(size=(5, 13, 17)).astype(np.float32)
    ours = upsample_bilinear(x, (50, 41), align_corners)
    ref = F.interpolate(torch.from_numpy(x)[None], size=(50, 41), mode="bilinear", align_corners=align_corners)[0]
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_crf_moves_a_blurred_boundary_onto_the_image_edge():
    """Two flat colour regions meeting at x = 30; the scores put a soft boundary at x = 37.5."""
    h, w, edge, shifted = 40, 64, 30, 37.5
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :edge] = (200, 40, 40)
    image[:, edge:] = (40, 40, 200)
    x = np.arange(w, dtype=np.float32)
    left = np.broadcast_to(1 / (1 + np.exp((x - shifted) / 4)), (h, w))
    prob = np.stack([left, 1 - left]).astype(np.float32)
    truth = np.broadcast_to((x >= edge).astype(np.int64), (h, w))
    crf = load_config(REPO / "configs/beco_voc.yaml").test.crf
    plain = prob.argmax(0)
    refined = crf_predict(prob, crf_image(image, False, crf.legacy_mean), crf, prune=False)
    assert (plain != truth).sum() == h * 8  # columns 30..37 wrong before
    assert (refined != truth).sum() <= h  # at most one column off after
    np.testing.assert_array_equal(crf_predict(prob, image.copy(), crf, prune=True), refined)


def test_label_pruning_keeps_present_labels_and_matches_full_crf():
    rng = np.random.default_rng(3)
    h, w = 48, 56
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image[:, : w // 2] //= 4
    logits = np.full((6, h // 4, w // 4), -12.0, np.float32)
    logits[0] = rng.normal(2, 1, logits[0].shape)
    logits[3] = rng.normal(2, 1, logits[3].shape)
    logits[5, :2, :2] = 0.0  # weak but not negligible in one corner
    prob = softmax(upsample_bilinear(logits, (h, w), False))
    crf = load_config(REPO / "configs/beco_voc.yaml").test.crf
    assert kept_labels(prob, 1e-3).tolist() == [0, 3, 5]
    full = crf_predict(prob, image, crf, prune=False)
    np.testing.assert_array_equal(crf_predict(prob, image, crf, prune=True), full)
    # One label left: the answer is that label, no CRF needed.
    only = np.zeros_like(prob)
    only[2] = 1
    assert (crf_predict(only, image, crf, prune=True) == 2).all()


def test_legacy_crf_image_wraps_like_the_reference_uint8_cast():
    mean = [122.675, 116.669, 104.008]
    image = np.array([[[0, 0, 0], [255, 255, 255], [122, 117, 104], [10, 200, 104]]], np.uint8)
    legacy = crf_image(image, True, mean)
    # The reference: (image - mean).astype(np.uint8); negatives wrap around modulo 256.
    expected = np.array([[[134, 140, 152], [132, 138, 150], [0, 0, 0], [144, 83, 0]]], np.uint8)
    np.testing.assert_array_equal(legacy, expected)
    np.testing.assert_array_equal(legacy, (image - np.array(mean)).astype(np.uint8))
    np.testing.assert_array_equal(crf_image(image, False, mean), image)
    pred, pred_crf = postprocess(np.zeros((3, 4, 4), np.float32), np.zeros((8, 8, 3), np.uint8), None, False)
    assert pred.shape == (8, 8) and pred_crf is None


# ----------------------------------------------------------------------------- test.py

def test_val_miou_equals_an_independent_computation(syn_root, tmp_path):
    logits = _make_run(syn_root, tmp_path / "run", "val")
    r = _test_py_subprocess("--logits_dir", str(logits), "--mode", "val", "--n-jobs", "2", "--vis", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    ids = _ids(syn_root, "val")
    preds, gts = {}, {}
    for i in ids:
        img = Image.open(run / "val_pred" / f"{i}.png")
        assert img.mode == "P" and np.array_equal(np.array(img.getpalette()[:48]), voc_palette()[:16].reshape(-1))
        preds[i] = np.asarray(img)
        gts[i] = np.asarray(Image.open(syn_root / "VOC2012/SegmentationClass" / f"{i}.png"))
        # The prediction is the argmax of the saved map upsampled to the original size.
        up = F.interpolate(torch.from_numpy(np.load(logits / f"{i}.npy"))[None], size=gts[i].shape,
                           mode="bilinear", align_corners=False)[0]
        np.testing.assert_array_equal(preds[i], up.softmax(0).argmax(0).numpy())
    scores = json.loads((run / "val_pred_scores.json").read_text())
    miou, ious = _independent_miou(preds, gts)
    assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["iou"] == pytest.approx(ious, abs=1e-12)
    assert scores["class_names"] == ["background", "aeroplane", "bicycle", "bird"]
    assert scores["num_images"] == len(ids) and scores["crf"] is None
    assert f"mIoU {miou:.4f}" in r.stdout
    # Pictures: image | prediction | CRF | ground truth, titled, with a legend below.
    vis = sorted((run / "val_vis").iterdir())
    assert [p.stem for p in vis] == ids[:2]
    picture = np.asarray(Image.open(vis[0]))
    assert picture.shape[1] >= 4 * 64 and picture.shape[0] > 64


def test_crf_predictions_scores_and_pruning_identity(cli, syn_root, tmp_path):
    logits = _make_run(syn_root, tmp_path / "run", "val")
    run = tmp_path / "run"
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--crf", "--n-jobs", "2", "--no-crf-prune-labels")
    assert r.returncode == 0, r.stderr[-3000:]
    ids = _ids(syn_root, "val")
    full = {i: np.asarray(Image.open(run / "val_pred_crf" / f"{i}.png")) for i in ids}
    gts = {i: np.asarray(Image.open(syn_root / "VOC2012/SegmentationClass" / f"{i}.png")) for i in ids}
    scores = json.loads((run / "val_pred_crf_scores.json").read_text())
    assert scores["miou"] == pytest.approx(_independent_miou(full, gts)[0], abs=1e-12)
    assert scores["crf"]["bilateral_sxy"] == 67 and scores["crf"]["prune_labels"] is False

    # Other CRF settings into the same folder are refused, never mixed in...
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--crf", "--n-jobs", "2", "--crf-prune-labels")
    assert r.returncode == 1 and "other inputs or settings" in r.stderr and "settings.crf.prune_labels" in r.stderr
    # ...and with --overwrite they replace them: the label-pruned CRF gives the same predictions.
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--crf", "--n-jobs", "1", "--crf-prune-labels",
                 "--crf-prune-threshold", "1e-3", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    for i in ids:
        np.testing.assert_array_equal(np.asarray(Image.open(run / "val_pred_crf" / f"{i}.png")), full[i])
    stamp = json.loads((run / "val_pred_crf" / "_provenance.json").read_text())["settings"]
    assert stamp["crf"]["prune_labels"] is True and stamp["crf"]["prune_threshold"] == 1e-3

    # The reference's corrupted CRF image is one flag away, with CRF parameters from flags.
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--crf", "--crf-legacy-image",
                 "--crf-bilateral-srgb", "5", "--crf-iterations", "3", "--overwrite", "--n-jobs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    crf = json.loads((run / "val_pred_crf_scores.json").read_text())["crf"]
    assert crf["legacy_image"] is True and crf["bilateral_srgb"] == 5 and crf["iterations"] == 3


def test_test_mode_writes_the_voc_server_layout_and_tar(cli, syn_root, tmp_path):
    logits = _make_run(syn_root, tmp_path / "run", "test")
    r = _run(cli, "--logits_dir", str(logits), "--mode", "test", "--crf", "--n-jobs", "2", "--vis", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    ids = _ids(syn_root, "test")
    layout = run / "test_pred_crf_submission/results/VOC2012/Segmentation/comp6_test_cls"
    assert sorted(p.name for p in layout.iterdir()) == sorted(f"{i}.png" for i in ids)
    for i in ids:
        assert (layout / f"{i}.png").read_bytes() == (run / "test_pred_crf" / f"{i}.png").read_bytes()
        img = Image.open(layout / f"{i}.png")
        assert img.mode == "P" and img.size == Image.open(syn_root / "VOC2012/JPEGImages" / f"{i}.jpg").size
    with tarfile.open(run / "test_pred_crf_submission.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"results/VOC2012/Segmentation/comp6_test_cls/{i}.png" for i in ids)
    assert not (run / "test_pred_crf_scores.json").exists()
    assert len(list((run / "test_vis").iterdir())) == 1


def test_bad_input_names_the_id_keeps_finished_work_and_resumes(cli, syn_root, tmp_path):
    logits = _make_run(syn_root, tmp_path / "run", "val")
    run = tmp_path / "run"
    # Maps with a record (as main.py --test writes one): the hand-repaired map below does not
    # change what made the folder. Without it, any rewritten map makes the predictions stale
    # (test_foreign_maps_rewritten_make_the_predictions_stale).
    save_json(logits / provenance.RECORD_NAME, provenance.make_record("main.py --test", {}, {"by": "hand"}))
    ids = _ids(syn_root, "val")
    args = ["--logits_dir", str(logits), "--mode", "val", "--n-jobs", "2"]

    # A map with the wrong class count fails with its id; the other ids' predictions are kept.
    good = np.load(logits / f"{ids[-1]}.npy")
    np.save(logits / f"{ids[-1]}.npy", good[:3])
    r = _run(cli, *args)
    assert r.returncode == 1 and f"'{ids[-1]}'" in r.stderr and "3 classes" in r.stderr
    done = {p.stem for p in (run / "val_pred").glob("*.png")}
    assert ids[-1] not in done and len(done) >= 1
    mtimes = {i: (run / "val_pred" / f"{i}.png").stat().st_mtime_ns for i in done}
    np.save(logits / f"{ids[-1]}.npy", good)

    # A missing map and a map of an id the split list lacks: refused before any work.
    (logits / f"{ids[0]}.npy").rename(tmp_path / "moved.npy")
    r = _run(cli, *args)
    assert r.returncode == 1 and f"logits missing for id '{ids[0]}'" in r.stderr
    (tmp_path / "moved.npy").rename(logits / f"{ids[0]}.npy")
    np.save(logits / "2099_999999.npy", good)
    r = _run(cli, *args)
    assert r.returncode == 1 and "'2099_999999'" in r.stderr and "not in the split list" in r.stderr
    (logits / "2099_999999.npy").unlink()

    # The rerun finishes the rest and leaves the finished predictions untouched...
    r = _run(cli, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(ids) - len(done)} predictions written, {len(done)} already there" in r.stdout
    assert all((run / "val_pred" / f"{i}.png").stat().st_mtime_ns == t for i, t in mtimes.items())
    first = json.loads((run / "val_pred_scores.json").read_text())["miou"]
    # ...and --overwrite redoes everything, with the same result.
    r = _run(cli, *args, "--overwrite")
    assert r.returncode == 0 and f"{len(ids)} predictions written, 0 already there" in r.stdout
    assert json.loads((run / "val_pred_scores.json").read_text())["miou"] == first

    # No config beside the logits folder: say so, and how to pass one.
    (run / "config.yaml").rename(run / "elsewhere.yaml")
    r = _run(cli, *args)
    assert r.returncode == 2 and "--config" in r.stderr
    r = _run(cli, *args, "--config", str(run / "elsewhere.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("crf", [False, True])
def test_a_map_with_nan_is_refused_naming_the_id_with_and_without_crf(cli, syn_root, tmp_path, crf):
    """NaN wins every arg-max: unchecked, its pixels would be scored as the last class."""
    logits = _make_run(syn_root, tmp_path / "run", "val")
    ids = _ids(syn_root, "val")
    bad = np.load(logits / f"{ids[1]}.npy")
    bad[2, 3:5, 3:5] = np.nan
    np.save(logits / f"{ids[1]}.npy", bad)
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1", *(["--crf"] if crf else []))
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"score map for id '{ids[1]}' holds NaN/Inf at 4 values: {logits / (ids[1] + '.npy')}" in r.stderr
    assert not (tmp_path / "run" / ("val_pred_crf_scores.json" if crf else "val_pred_scores.json")).exists()


def test_a_split_list_with_an_id_twice_is_refused(cli, tmp_path):
    root = tmp_path / "data"
    make_synthetic_voc(root, train=2, val=3, test=0, size=(64, 64), classes=NUM_CLASSES - 1, seed=2)
    logits = _make_run(root, tmp_path / "run", "val")
    val = root / "VOC2012/ImageSets/Segmentation/val.txt"
    ids = _ids(root, "val")
    val.write_text("".join(f"{i}\n" for i in ids + [ids[0]]))  # counted twice in the mIoU otherwise
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1")
    assert r.returncode == 1 and f"id '{ids[0]}' is listed twice in {val}, on lines 1 and 4" in r.stderr


def test_workers_start_after_multithreaded_opencv_in_the_parent(tmp_path):
    """A forked worker that had to shut down OpenCV's inherited thread pool waited forever:
    parallel_map now sets the thread limits before forking (a subprocess, so a hang fails)."""
    script = tmp_path / "fork_after_cv2.py"
    script.write_text(
        "import cv2, numpy as np\n"
        "from utils.crf import parallel_map\n"
        "img = (np.random.rand(1500, 1500) > 0.5).astype(np.uint8)\n"
        "for _ in range(3): cv2.distanceTransform(img, cv2.DIST_L2, 5)\n"
        "def work(i): return float(cv2.GaussianBlur(np.ones((300, 300), np.float32), (5, 5), 0).sum())\n"
        "if __name__ == '__main__':\n"
        "    print(sorted(parallel_map(work, list(range(4)), 2, 1)), cv2.getNumThreads())\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("]")[0].count("90000.0") == 4


def test_foreign_maps_rewritten_make_the_predictions_stale(cli, syn_root, tmp_path):
    """Maps without a record (another tool's) are known by their files' names, sizes and times:
    one rewritten map refuses the predictions made from the old ones, nothing is deleted."""
    logits = _make_run(syn_root, tmp_path / "run", "val")
    args = ["--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1"]
    assert _run(cli, *args).returncode == 0
    preds = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "val_pred").glob("*.png")}
    first = sorted(logits.glob("*.npy"))[0]
    np.save(first, np.load(first) * 2)
    r = _run(cli, *args)
    assert r.returncode == 1 and "inputs.score_maps.listing" in r.stderr and "--overwrite" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "val_pred").glob("*.png")} == preds
    r = _run(cli, *args, "--overwrite")
    assert r.returncode == 0 and f"{len(preds)} predictions written, 0 already there" in r.stdout


def test_ground_truth_without_foreground_records_no_score(cli, tmp_path):
    """Before: an all-background val set scored a "perfect" mIoU of 1.0 on the card."""
    root = tmp_path / "data"
    make_synthetic_voc(root, train=2, val=2, test=0, size=(32, 32), classes=NUM_CLASSES - 1, seed=4)
    for gt in (root / "VOC2012/SegmentationClass").glob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8), mode="P").save(gt)
    logits = _make_run(root, tmp_path / "run", "val")
    r = _run(cli, "--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1")
    assert r.returncode == 1 and "has a foreground pixel" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "val_pred_scores.json").exists()

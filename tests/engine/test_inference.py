"""main.py --test on tiny synthetic data (CPU): saved maps for every id, checkpoint formats (ours
and the reference's released one), resume/overwrite, float16, multi-scale and flip, torchrun
shards, a split without labels, and the hand-over to test.py through the saved config."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt_io
from tests.conftest import REPO, eval_nets
from engine.config import load_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
NUM_CLASSES = 4
OVERRIDES = ["data.synthetic=null", f"data.num_classes={NUM_CLASSES}",
             "data.crop_size=64", "data.val_size=64", "data.num_workers=0"]


@pytest.fixture(scope="module")
def syn_root(synthetic_set) -> Path:
    return synthetic_set("voc", train=2, val=6, test=2, size=(64, 64), classes=NUM_CLASSES - 1, seed=2)


@pytest.fixture(scope="module")
def nets(syn_root):
    """Two differently initialised nets with non-trivial BN statistics, in eval mode."""
    return eval_nets(load_config(REPO / "configs/demo.yaml", [f"data.root={syn_root}", *OVERRIDES]), 0)


def _args(root: Path, logs: Path, tag: str, ckpt: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo.yaml"), "--test", "--ckpt", str(ckpt), "--logging_path_base",
            str(logs), "--logging_tag", tag, f"data.root={root}", *OVERRIDES, *extra]


def _main(argv: list[str]) -> tuple[int, str]:
    import main as main_mod
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main_mod.main(argv)
    return rc, err.getvalue()


def _ids(root: Path, split: str) -> list[str]:
    return (root / "VOC2012/ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def _reference_format(nets, path: Path) -> Path:
    """The reference's released file: nets only, keys with DDP's ``module.`` prefix."""
    torch.save({"net_state_dict": {name: {f"module.{k}": v for k, v in net.state_dict().items()}
                                   for name, net in zip(ckpt_io.NET_NAMES, nets)}}, path)
    return path


@torch.no_grad()
def _expected(nets, root: Path, split: str = "val") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per id: the nets' averaged stride-4 pre_logits and full-size logits, straight from the nets."""
    from datasets.segmentation import EvalSet as VOCEvalSet
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={root}", *OVERRIDES])
    data = VOCEvalSet(cfg.data, split, with_labels=split != "test")
    out = {}
    for k in range(len(data)):
        item = data[k]
        outs = [n(item["image"][None]) for n in nets]
        out[item["id"]] = (sum(o["pre_logits"] for o in outs)[0].numpy() / 2,
                           sum(o["logits"] for o in outs)[0].numpy() / 2)
    return out


def test_reference_checkpoint_gives_the_nets_logits_for_every_id_and_resumes(syn_root, nets, tmp_path):
    ckpt = _reference_format(nets, tmp_path / "released.pth")
    rc, err = _main(_args(syn_root, tmp_path, "ref", ckpt))
    assert rc == 0, err[-3000:]
    run = tmp_path / "ref"
    expected = _expected(nets, syn_root)
    ids = _ids(syn_root, "val")
    assert sorted(p.stem for p in (run / "logits").glob("*.npy")) == sorted(ids)
    for i in ids:
        saved = np.load(run / "logits" / f"{i}.npy")
        assert saved.shape == (NUM_CLASSES, 16, 16) and saved.dtype == np.float32  # stride 4 of 64x64
        np.testing.assert_allclose(saved, expected[i][0], atol=1e-5)
    # 64x64 metrics = validation's: argmax of the averaged full-size logits against the label.
    from datasets.segmentation import EvalSet as VOCEvalSet
    from utils.metrics import segmentation_scores
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={syn_root}", *OVERRIDES])
    data = VOCEvalSet(cfg.data, "val")
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for k in range(len(data)):
        label = data[k]["label"].numpy()
        pred = expected[data[k]["id"]][1].argmax(0)
        valid = label != 255
        np.add.at(conf, (label[valid], pred[valid]), 1)
    scores = json.loads((run / "logits_scores.json").read_text())
    assert scores["miou"] == pytest.approx(segmentation_scores(conf)["miou"], abs=1e-9)
    assert (run / "test.log").is_file() and "mIoU" in (run / "test.log").read_text()
    saved_cfg = load_config(run / "config.yaml")
    assert saved_cfg.data.root == str(syn_root) and saved_cfg.data.num_classes == NUM_CLASSES

    # A rerun keeps every saved map and reports the same metrics from them.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "logits").glob("*.npy")}
    rc, err = _main(_args(syn_root, tmp_path, "ref", ckpt))
    assert rc == 0, err[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (run / "logits").glob("*.npy")} == mtimes
    assert json.loads((run / "logits_scores.json").read_text())["miou"] == pytest.approx(scores["miou"], abs=1e-9)
    assert "0 maps written, 6 already there" in (run / "test.log").read_text()

    # Maps of another checkpoint are never mixed in: refused, then replaced with --overwrite.
    best = tmp_path / "best_ckpt.pth"
    ckpt_io.save_best(best, nets)
    rc, err = _main(_args(syn_root, tmp_path, "ref", best))
    assert rc == 1 and "other inputs or settings" in err and "checkpoint.sha256" in err
    rc, err = _main(_args(syn_root, tmp_path, "ref", best, "--overwrite"))
    assert rc == 0, err[-3000:]
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in (run / "logits").glob("*.npy"))
    for i in ids:  # our best_ckpt.pth format: the same nets, the same maps
        np.testing.assert_allclose(np.load(run / "logits" / f"{i}.npy"), expected[i][0], atol=1e-5)


def test_resumable_checkpoint_loads_and_mismatches_are_refused(syn_root, nets, tmp_path):
    resumable = tmp_path / "latest_ckpt.pth"
    ckpt_io.save(resumable, {"net_state_dict": {n: net.state_dict() for n, net in zip(ckpt_io.NET_NAMES, nets)},
                             "optimizer": {}, "scheduler": {}, "epoch": 3, "iteration": 12, "best_miou": 0.1})
    rc, err = _main(_args(syn_root, tmp_path, "resumable", resumable))
    assert rc == 0, err[-3000:]
    expected = _expected(nets, syn_root)
    for i, (pre, _) in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / "resumable/logits" / f"{i}.npy"), pre, atol=1e-5)

    state = torch.load(resumable, weights_only=False)
    del state["net_state_dict"]["network2"]["classifier.weight"]
    torch.save(state, tmp_path / "broken.pth")
    rc, err = _main(_args(syn_root, tmp_path, "broken", tmp_path / "broken.pth"))
    assert rc == 1 and "network2" in err and "classifier.weight" in err
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    rc, err = _main(_args(syn_root, tmp_path, "foreign", tmp_path / "foreign.pth"))
    assert rc == 1 and "no 'net_state_dict'" in err
    rc, err = _main(_args(syn_root, tmp_path, "missing", tmp_path / "nothing.pth"))
    assert rc == 1 and "checkpoint not found" in err


def test_float16_multi_scale_and_flip_maps(syn_root, nets, tmp_path):
    ckpt = _reference_format(nets, tmp_path / "released.pth")
    assert _main(_args(syn_root, tmp_path, "plain", ckpt))[0] == 0
    rc, err = _main(_args(syn_root, tmp_path, "half", ckpt, "test.logits_dtype=float16"))
    assert rc == 0, err[-3000:]
    rc, err = _main(_args(syn_root, tmp_path, "msc", ckpt, "test.multi_scale=true"))
    assert rc == 0, err[-3000:]
    rc, err = _main(_args(syn_root, tmp_path, "msc", ckpt, "test.multi_scale=true", "test.flip=true",
                          "test.logits_dtype=float16"))
    assert rc == 0, err[-3000:]
    for i in _ids(syn_root, "val"):
        plain = np.load(tmp_path / "plain/logits" / f"{i}.npy")
        half = np.load(tmp_path / "half/logits" / f"{i}.npy")
        assert half.dtype == np.float16 and half.nbytes * 2 == plain.nbytes
        np.testing.assert_allclose(half.astype(np.float32), plain, rtol=2e-3, atol=2e-3)
        # Pixel-wise max over the base map and the scaled ones: never below the base map.
        msc = np.load(tmp_path / "msc/logits_msc" / f"{i}.npy")
        assert msc.shape == plain.shape and (msc >= plain - 1e-5).all() and (msc > plain + 1e-3).any()
        flip = np.load(tmp_path / "msc/logits_msc_flip" / f"{i}.npy")
        assert flip.shape == plain.shape and flip.dtype == np.float16
    assert json.loads((tmp_path / "msc/logits_msc_flip_scores.json").read_text())["flip"] is True


def test_split_without_labels_writes_maps_and_no_metrics(syn_root, nets, tmp_path):
    ckpt = _reference_format(nets, tmp_path / "released.pth")
    rc, err = _main(_args(syn_root, tmp_path, "t", ckpt, "test.split=test"))
    assert rc == 0, err[-3000:]
    expected = _expected(nets, syn_root, "test")
    assert sorted(p.stem for p in (tmp_path / "t/logits").glob("*.npy")) == sorted(expected)
    for i, (pre, _) in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / "t/logits" / f"{i}.npy"), pre, atol=1e-5)
    assert not (tmp_path / "t/logits_scores.json").exists()


@pytest.mark.slow
def test_torchrun_shards_then_test_py_finds_the_data_through_the_saved_config(syn_root, nets, tmp_path):
    from utils.distributed import free_port
    ckpt = _reference_format(nets, tmp_path / "released.pth")
    assert _main(_args(syn_root, tmp_path, "single", ckpt))[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    r = subprocess.run(launcher + ["main.py"] + _args(syn_root, tmp_path, "ddp", ckpt), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = _ids(syn_root, "val")
    for i in ids:  # each id written once, by one of the two ranks, identical to the single process
        np.testing.assert_allclose(np.load(tmp_path / "ddp/logits" / f"{i}.npy"),
                                   np.load(tmp_path / "single/logits" / f"{i}.npy"), atol=1e-5)
    single = json.loads((tmp_path / "single/logits_scores.json").read_text())
    ddp = json.loads((tmp_path / "ddp/logits_scores.json").read_text())
    assert ddp["miou"] == pytest.approx(single["miou"], abs=1e-12) and ddp["num_images"] == len(ids)
    assert "2 process(es)" in (tmp_path / "ddp/test.log").read_text()

    # test.py reads the data set from <run>/config.yaml; at the original size (64x64 = val_size)
    # its mIoU is the one main.py reported.
    r = subprocess.run([sys.executable, "test.py", "--logits_dir", str(tmp_path / "ddp/logits"), "--mode", "val",
                        "--n-jobs", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    full_res = json.loads((tmp_path / "ddp/val_pred_scores.json").read_text())
    assert full_res["miou"] == pytest.approx(ddp["miou"], abs=1e-6)


def test_val_sampler_counts_each_id_once_or_pads_like_the_reference():
    """QUIRK-S13: 1,449 VOC val ids on 4 ranks: ours 1,449 (each once), the reference's 1,452."""
    from engine.evaluate import val_sampler
    ours = [i for r in range(4) for i in val_sampler(1449, r, 4, False)]
    assert sorted(ours) == list(range(1449))
    ref = [i for r in range(4) for i in val_sampler(1449, r, 4, True)]
    assert len(ref) == 1452 and sorted(set(ref)) == list(range(1449))
    assert len([i for r in range(4) for i in val_sampler(40_504, r, 4, True)]) == 40_504  # COCO: no padding

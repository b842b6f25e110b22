"""End-to-end training on tiny synthetic data (CPU): single process (multi-process runs:
tests/cli/test_launchers.py; kills and resumes: tests/engine/test_reliability.py), AMP, determinism,
checkpoint formats, non-finite loss, gradient accumulation, learning, and every registered
segmenter through training, --test and test.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.synthetic.voc import make_synthetic_voc
from models import MODELS
from tests.conftest import CPU_CONFIGS, REPO

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "data"
    make_synthetic_voc(root, train=16, val=6, test=2, size=(64, 64), classes=3, seed=0)
    return root


def _args(root: Path, logs: Path, tag: str, *extra: str, config: str = "demo.yaml") -> list[str]:
    return ["--config", str(REPO / "configs" / config), "--logging_path_base", str(logs), "--logging_tag", tag,
            f"data.root={root}", "data.synthetic=null", "data.num_classes=4",
            "data.crop_size=64", "data.val_size=64", "data.batch_size=4", "data.num_workers=0",
            "train.epochs=2", "train.num_vis=2", *extra]


def _run(args: list[str], launcher: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = (launcher or [sys.executable]) + ["main.py"] + args
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, **kw)


def _iters(run_dir: Path) -> dict[int, dict]:
    """Per-iteration records; a resumed run rewrites the killed epoch's iterations, the last one wins."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["iter"]] = rec
    return out


def test_single_process_training_writes_resumable_and_best_checkpoints(syn_root, tmp_path):
    r = _run(_args(syn_root, tmp_path, "single"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "single"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "train.log", "train_log.jsonl", "val_log.jsonl",
                                               "latest_ckpt.pth", "best_ckpt.pth", "tb"}
    latest = torch.load(run / "latest_ckpt.pth", weights_only=False)
    assert latest["epoch"] == 1 and latest["iteration"] == 2 * 4  # 16 images / batch 4, 2 epochs
    assert latest["method"] == {"name": "beco", "epoch": 1}
    assert set(latest) >= {"optimizer", "scheduler", "scaler", "rng", "best_miou"}
    best = torch.load(run / "best_ckpt.pth", weights_only=True)
    assert list(best) == ["net_state_dict"] and sorted(best["net_state_dict"]) == ["network1", "network2"]
    # The two nets start from different decoder draws.
    n1, n2 = best["net_state_dict"]["network1"], best["net_state_dict"]["network2"]
    assert not torch.equal(n1["classifier.weight"], n2["classifier.weight"])
    iters = _iters(run)
    assert sorted(iters) == list(range(8))
    for rec in iters.values():
        assert set(rec) >= {"lr", "ce1", "ce2", "cot1", "cot2", "total"}
        assert rec["total"] == pytest.approx(rec["ce1"] + rec["ce2"] + rec["cot1"] + rec["cot2"], rel=1e-5)
    # Poly schedule per iteration: lr = max(base * (1 - it/max_it)^0.9, 1e-5), base from demo.yaml.
    for it, rec in iters.items():
        assert rec["lr"] == pytest.approx(max(0.05 * (1 - it / 8) ** 0.9, 1e-5), rel=1e-9)
    vals = [json.loads(l) for l in (run / "val_log.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in vals] == [1, 2] and all(0 <= v["miou"] <= 1 for v in vals)


def test_amp_on_cpu_uses_bf16_and_trains(syn_root, tmp_path):
    r = _run(_args(syn_root, tmp_path, "amp", "train.epochs=1", "--amp"))
    assert r.returncode == 0, r.stderr[-3000:]
    iters = _iters(tmp_path / "amp")
    assert len(iters) == 4 and all(torch.isfinite(torch.tensor(v["total"])) for v in iters.values())
    assert "amp True" in (tmp_path / "amp" / "train.log").read_text()


def test_checkpoint_reload_is_bit_identical(syn_root, tmp_path):
    from engine import checkpoint as ckpt_io
    from models import build_model
    from engine.config import load_config
    r = _run(_args(syn_root, tmp_path, "reload", "train.epochs=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(REPO / "configs/demo.yaml", ["data.synthetic=null", "data.num_classes=4"])
    nets = [build_model(cfg.model, cfg.data.num_classes) for _ in range(2)]
    best = ckpt_io.load(tmp_path / "reload" / "best_ckpt.pth")
    ckpt_io.load_nets(best, nets, "best")
    for name, net in zip(ckpt_io.NET_NAMES, nets):
        for k, v in net.state_dict().items():
            assert torch.equal(v, best["net_state_dict"][name][k])
    ckpt_io.save_best(tmp_path / "again.pth", nets)
    again = ckpt_io.load(tmp_path / "again.pth")
    for name in ckpt_io.NET_NAMES:
        for k, v in best["net_state_dict"][name].items():
            assert torch.equal(v, again["net_state_dict"][name][k])
    # A mismatching checkpoint is refused with the key named.
    del best["net_state_dict"]["network2"]["classifier.bias"]
    with pytest.raises(ValueError, match="network2.*classifier.bias"):
        ckpt_io.load_nets(best, nets, "broken")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(syn_root, tmp_path, monkeypatch):
    import engine.beco
    import main as main_mod
    assert main_mod.main(_args(syn_root, tmp_path, "nan", "train.epochs=1")) == 0
    ckpt = tmp_path / "nan" / "latest_ckpt.pth"
    before = ckpt.read_bytes()
    real = engine.beco.training_step

    def poisoned(*a, **k):
        out = real(*a, **k)
        out["total"] = out["total"] * float("nan")
        return out
    monkeypatch.setattr(engine.beco, "training_step", poisoned)
    rc = main_mod.main(_args(syn_root, tmp_path, "nan", "train.epochs=2", "--allow-config-change", "--ckpt", str(ckpt)))
    assert rc == 1
    assert ckpt.read_bytes() == before
    assert "non-finite loss at epoch 2, iteration 4" in (tmp_path / "nan" / "train.log").read_text()


def test_short_run_beats_the_untrained_model(syn_root, tmp_path):
    """Val mIoU after a few epochs is clearly above the same nets' mIoU at initialisation."""
    from engine.evaluate import evaluate
    from engine.build import build_loaders, build_nets
    from engine.config import load_config
    from utils.distributed import init_distributed
    from utils.runtime import make_autocast, set_seed
    extra = ["train.epochs=4", "method.co_training_start_epoch=2"]
    r = _run(_args(syn_root, tmp_path, "learn", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    trained = max(json.loads(l)["miou"] for l in (tmp_path / "learn" / "val_log.jsonl").read_text().splitlines())

    # The same construction as engine.trainer.start: seed, then the nets, so these are the run's initial weights.
    cfg = load_config(REPO / "configs/demo.yaml", _args(syn_root, tmp_path, "x", *extra)[6:])
    info = init_distributed()
    set_seed(cfg.train.seed)
    _, val_loader, _ = build_loaders(cfg, info)
    nets = build_nets(cfg, info)
    untrained, _ = evaluate(nets, val_loader, cfg.data.num_classes, info.device, make_autocast(cfg, info.device),
                            show_progress=False)
    assert trained > untrained["miou"] + 0.05, (trained, untrained["miou"])


def test_demo_config_generates_missing_synthetic_data(tmp_path):
    root = tmp_path / "fresh"
    args = ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(tmp_path / "logs"),
            f"data.root={root}", "data.synthetic.train=8", "data.synthetic.val=2", "data.synthetic.test=1",
            "data.synthetic.size=[64, 64]", "data.synthetic.seed=3",
            "data.crop_size=64", "data.val_size=64", "data.batch_size=4", "data.num_workers=0", "train.epochs=1"]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generating the synthetic VOC-format set" in (tmp_path / "logs" / "quickstart" / "train.log").read_text()
    assert len(list((root / "irn_mask").glob("*.png"))) == 8
    # Other generator settings on the same root: refused by name, not trained on stale data.
    r = _run(args + ["data.synthetic.train=9", "--logging_tag", "other"])
    assert r.returncode == 1 and "synthetic" in r.stderr and "train" in r.stderr
    assert not (tmp_path / "logs" / "other").exists()  # refused before its run folder was written


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_segmenter_trains_tests_and_scores_end_to_end(name, syn_root, tmp_path):
    """1 epoch of BECO (past its warm-up: online labels, mixing, co-training) and 1 of the CE
    baseline at CPU size, then main.py --test with multi-scale and flip (score maps at the
    segmenter's stride) and test.py with the CRF."""
    config, stride = CPU_CONFIGS[name]
    r = _run(_args(syn_root, tmp_path, "beco", "train.epochs=1", "method.warmup_epochs=0",
                   "method.co_training_start_epoch=0", config=config))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "beco"
    assert f"model {name}" in (run / "train.log").read_text()
    vals = [json.loads(line) for line in (run / "val_log.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in vals] == [1] and all(0 <= v["miou"] <= 1 for v in vals)
    best = torch.load(run / "best_ckpt.pth", weights_only=True)["net_state_dict"]
    assert sorted(best) == ["network1", "network2"]
    assert all(torch.isfinite(v.float()).all() for v in best["network1"].values())

    r = _run(_args(syn_root, tmp_path, "beco", "--test", "--ckpt", str(run / "best_ckpt.pth"),
                   "test.multi_scale=true", "test.scales=[0.75, 1.25]", "test.flip=true", config=config))
    assert r.returncode == 0, r.stderr[-3000:]
    maps = sorted((run / "logits_msc_flip").glob("*.npy"))
    assert len(maps) == 6
    assert np.load(maps[0]).shape == (4, 64 // stride, 64 // stride)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "test.py", "--logits_dir", str(run / "logits_msc_flip"), "--mode", "val",
                        "--crf", "--n-jobs", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((run / "val_pred_msc_flip_crf_scores.json").read_text())
    assert 0 <= scores["miou"] <= 1 and len(scores["iou"]) == 4

    r = _run(_args(syn_root, tmp_path, "baseline", "train.epochs=1", "method.name=baseline", "method.mixing=false",
                   "method.co_training=false", config=config))
    assert r.returncode == 0, r.stderr[-3000:]
    base = torch.load(tmp_path / "baseline" / "best_ckpt.pth", weights_only=True)["net_state_dict"]
    assert sorted(base) == ["network1"]


def test_gradient_accumulation_logs_its_total_batch_and_resumes_mid_step_sequence_exactly(syn_root, tmp_path):
    """16 images, 2 per micro-batch, train.grad_accum 2: 4 optimiser steps an epoch. A SIGTERM
    during step 2, then a resume, gives the uninterrupted run's losses (the resumed sampler
    starts after step x batch x accumulation samples)."""
    import signal
    import engine.beco
    import main as main_mod
    extra = ["train.epochs=1", "data.batch_size=2", "train.grad_accum=2", "--determ"]
    assert main_mod.main(_args(syn_root, tmp_path, "whole", *extra)) == 0
    whole = tmp_path / "whole"
    assert [r["iter"] for r in _iters(whole).values()] == [0, 1, 2, 3]
    head = (whole / "config.yaml").read_text().splitlines()[0]
    assert head == ("# total batch 4 = 2 per process x 1 process(es) x 2 accumulation step(s) (train.grad_accum); "
                    "lr 0.05 (optim.lr)")
    assert head[2:] in (whole / "train.log").read_text()

    real, calls = engine.beco.training_step, [0]

    def signalled(*a, **k):
        calls[0] += 1
        if calls[0] == 3:  # the first micro-batch of optimiser step 2
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **k)
    engine.beco.training_step = signalled
    try:
        assert main_mod.main(_args(syn_root, tmp_path, "cut", *extra)) == 143
    finally:
        engine.beco.training_step = real
    cut = tmp_path / "cut"
    assert torch.load(cut / "latest_ckpt.pth", weights_only=False)["iteration"] == 2
    assert main_mod.main(_args(syn_root, tmp_path, "cut", *extra, "--ckpt", str(cut / "latest_ckpt.pth"))) == 0
    assert [r["total"] for r in _iters(cut).values()] == [r["total"] for r in _iters(whole).values()]

"""Nothing lost, nothing silent: run folders are never overwritten, a resume is checked before
anything is written and continues to the iteration (kills, SIGTERM), settings and inputs
outside their meaning stop with a named error."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.readers import read_mask
from tests.conftest import REPO, tiny_config
from utils.config import ConfigError
from utils.errors import DataError, one_line

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- settings and inputs

@pytest.mark.parametrize("override, message", [
    ("method.mix_prob=1.5", "'method.mix_prob': must be a probability in [0, 1], got 1.5"),
    ("method.threshold=2.0", "'method.threshold': must be a probability in [0, 1], got 2.0"),
    ("optim.lr=0", "'optim.lr': must be > 0, got 0.0"),
    ("optim.lr=-0.01", "'optim.lr': must be > 0, got -0.01"),
    ("data.batch_size=0", "'data.batch_size': must be > 0, got 0"),
    ("data.crop_size=0", "'data.crop_size': must be > 0, got 0"),
    ("train.epochs=0", "'train.epochs': must be > 0, got 0"),
    ("train.val_interval=0", "'train.val_interval': must be > 0, got 0"),
    ("train.log_interval=0", "'train.log_interval': must be > 0, got 0"),
    ("data.num_workers=-1", "'data.num_workers': must be >= 0, got -1"),
    ("train.ckpt_interval=0", "'train.ckpt_interval': must be >= 1 or null"),
    ("optim.momentum=1.0", "'optim.momentum': must be in [0, 1), got 1.0"),
])
def test_settings_outside_their_meaning_are_refused_by_name(tiny_voc, override, message):
    with pytest.raises(ConfigError) as e:
        tiny_config(tiny_voc, override)
    assert message in str(e.value)


def test_gpu_id_without_that_gpu_is_an_error():
    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "main.py", "--config", "configs/demo.yaml", "--gpu_id", "1"], cwd=REPO,
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "error: --gpu_id 1: this machine has no GPU" in r.stderr


def test_mask_formats_that_would_be_misread_are_refused(tmp_path):
    half = np.zeros((8, 8), np.uint8)
    half[:, :4] = 255
    # An LA mask's alpha is not the mask: an opaque alpha must not make every pixel reliable.
    Image.fromarray(np.stack([half, np.full_like(half, 255)], -1), mode="LA").save(tmp_path / "la.png")
    assert np.asarray(read_mask(tmp_path / "la.png", "la")).sum() == 32
    Image.fromarray(np.stack([half, half, half, np.full_like(half, 255)], -1), mode="RGBA").save(tmp_path / "rgba.png")
    assert np.asarray(read_mask(tmp_path / "rgba.png", "rgba")).sum() == 32
    # A JPEG-compressed mask, a pseudo-label given as a mask, a colour image: not binary.
    blurred = np.clip(half.astype(int) + np.arange(8)[None, :] * 3, 0, 255).astype(np.uint8)
    Image.fromarray(blurred).save(tmp_path / "jpeg_like.png")
    with pytest.raises(DataError, match=r"confidence mask for id 'j' has values .* not a binary 0/1 or 0/255 mask"):
        read_mask(tmp_path / "jpeg_like.png", "j")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 5).save(tmp_path / "label.png")
    with pytest.raises(DataError, match=r"has values \[0, 1, 2, 3, 4\], not a binary"):
        read_mask(tmp_path / "label.png", "p")
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    with pytest.raises(DataError, match="is a colour image"):
        read_mask(tmp_path / "red.png", "c")


class _Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        raise DataError(f"image for id 'x{i}' is unreadable or truncated: /data/x{i}.jpg")


def test_an_error_in_a_loader_worker_reaches_the_user_as_its_own_line():
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)  # what PyTorch makes of it
    assert one_line(e.value) == "image for id 'x0' is unreadable or truncated: /data/x0.jpg"


# ----------------------------------------------------------------------------- runs and resume



@pytest.fixture(scope="module")
def syn_root(synthetic_set) -> Path:
    return synthetic_set("voc", train=16, val=4, test=1, size=(48, 48), classes=3, seed=0)


def _args(root: Path, logs: Path, tag: str, *extra: str) -> list[str]:
    # Two loader workers, as on a GPU node: a SIGTERM to the process group reaches them too.
    return ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(logs), "--logging_tag", tag,
            f"data.root={root}", "data.synthetic=null", "data.num_classes=4", "data.crop_size=48",
            "data.val_size=48", "data.batch_size=4", "data.num_workers=2", "train.epochs=2", "train.num_vis=0",
            "method.warmup_epochs=1", "method.co_training_start_epoch=1", "train.ckpt_interval=null", "--determ",
            *extra]


def _main(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, env=ENV)


def _iters(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["net_state_dict"]


def _interrupt(args: list[str], run: Path, at: int, sig: int) -> int:
    """Start a run in its own session, send ``sig`` to its whole process group (the main process
    and its loader workers, as torchrun and SLURM do) once iteration ``at`` is logged; returns
    the main process's exit code."""
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = run / "train_log.jsonl"
        if log.is_file() and any(json.loads(line)["iter"] >= at for line in log.read_text().splitlines()
                                 if line.strip().endswith("}")):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=120)


@pytest.fixture(scope="module")
def full_run(syn_root, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    r = _main(_args(syn_root, logs, "full"))
    assert r.returncode == 0, r.stderr[-3000:]
    return logs / "full"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kills_and_sigterm_mid_epoch_then_resume_give_the_uninterrupted_weights(syn_root, full_run, tmp_path):
    """8 iterations (2 epochs of 4), checkpoints at epoch ends and on SIGTERM, 2 loader workers:
    SIGTERM to the process group at a random point of epoch 1 (exit 143, a mid-epoch checkpoint:
    the resume loads the epoch's first batches again for the workers' random streams), SIGKILL
    to it at a random point of epoch 2 (the resume starts from epoch 1's checkpoint, the
    workers reseeded as at every epoch start); the final weights and every logged loss equal
    the uninterrupted run's, bit for bit (CPU, --determ)."""
    rng = random.Random(0)
    run = tmp_path / "run"
    args = _args(syn_root, tmp_path, "run")
    code = _interrupt(args, run, rng.randint(0, 2), signal.SIGTERM)
    assert code == 143
    state = torch.load(run / "latest_ckpt.pth", weights_only=False)
    assert 1 <= state["iteration"] <= 3 and state["iteration"] % 4 != 0  # mid-epoch
    resume = args + ["--ckpt", str(run / "latest_ckpt.pth")]
    # A kill can also leave a temporary behind: the resume removes it.
    (run / ".latest_ckpt.pth.killed.tmp").write_bytes(b"partial")
    code = _interrupt(resume, run, rng.randint(5, 6), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert torch.load(run / "latest_ckpt.pth", weights_only=False)["iteration"] == 4  # epoch 1's end
    assert not (run / ".latest_ckpt.pth.killed.tmp").exists()
    r = _main(resume)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = _iters(run), _iters(full_run)
    assert [x["iter"] for x in got] == list(range(8))  # each iteration logged once
    assert [x["total"] for x in got] == [x["total"] for x in ref]
    a, b = _weights(run / "latest_ckpt.pth"), _weights(full_run / "latest_ckpt.pth")
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert len([json.loads(line) for line in (run / "val_log.jsonl").read_text().splitlines()]) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nothing_is_overwritten_and_a_resume_is_checked_before_writing(syn_root, full_run, tmp_path):
    logs = full_run.parent
    before = {p.name: p.stat().st_mtime_ns for p in full_run.iterdir() if p.is_file()}
    config = (full_run / "config.yaml").read_text()
    # The same run started again: refused, naming the folder and how to resume.
    r = _main(_args(syn_root, logs, "full"))
    assert r.returncode == 1
    assert f"{full_run} holds another run" in r.stderr and f"--ckpt {full_run / 'latest_ckpt.pth'}" in r.stderr
    # A resume with another lr: refused, naming the key and both values, before anything is written.
    r = _main(_args(syn_root, logs, "full", "optim.lr=0.5", "--ckpt", str(full_run / "latest_ckpt.pth")))
    assert r.returncode == 1 and "optim.lr: 0.05 -> 0.5" in r.stderr and "--allow-config-change" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in full_run.iterdir() if p.is_file()} == before
    assert (full_run / "config.yaml").read_text() == config
    # Networks only, somewhere else: refused, and nothing is written beside it.
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / "best_ckpt.pth").write_bytes((full_run / "best_ckpt.pth").read_bytes())
    r = _main(_args(syn_root, logs, "x", "--ckpt", str(elsewhere / "best_ckpt.pth")))
    assert r.returncode == 1 and "holds networks only" in r.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["best_ckpt.pth"]
    # An explicit change is honoured: one more epoch, and the poly schedule over the new length.
    resumed = tmp_path / "longer"
    resumed.mkdir()
    for name in ("latest_ckpt.pth", "config.yaml", "train_log.jsonl", "val_log.jsonl"):
        (resumed / name).write_bytes((full_run / name).read_bytes())
    r = _main(_args(syn_root, logs, "x", "train.epochs=3", "--allow-config-change",
                    "--ckpt", str(resumed / "latest_ckpt.pth")))
    assert r.returncode == 0, r.stderr[-3000:]
    log = _iters(resumed)
    assert [x["iter"] for x in log] == list(range(12))
    assert log[8]["lr"] == pytest.approx(0.05 * (1 - 8 / 12) ** 0.9)  # not the 2-epoch schedule's floor
    assert (resumed / "config.before-iteration-8.yaml").read_text() == config
    assert "epochs: 3" in (resumed / "config.yaml").read_text()

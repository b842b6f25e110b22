"""Checkpoints load with ``torch.load(weights_only=True)``: every one this project writes, and
nothing else unless the user trusts it (--trust-checkpoint); outputs get the permissions that
``open()`` would give them."""
from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datasets.synthetic.voc import make_synthetic_voc
from engine import checkpoint as ckpt_io
from tests.conftest import REPO
from utils.errors import CheckpointError

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
UNPICKLED: list[str] = []  # what _Payload's unpickling did: proof that code in a file ran


def _note(what: str) -> None:
    UNPICKLED.append(what)


class _Payload:
    """An object whose unpickling runs code (here a harmless note), as a malicious file's would."""

    def __reduce__(self):
        return (_note, ("ran",))


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), np.random.rand(), np.random.normal(),
            torch.rand(3).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_state_survives_a_weights_only_save_and_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # numpy's legacy generator now holds a cached Gaussian: it must come back too
    ckpt_io.save(tmp_path / "rng.pth", {"rng": [ckpt_io.rng_state()]})
    expected = _draws()
    state = torch.load(tmp_path / "rng.pth", weights_only=True)["rng"][0]
    _draws()  # move every stream on
    ckpt_io.set_rng_state(state)
    assert _draws() == expected


# ----------------------------------------------------------------------------- a run's checkpoints

def _train_args(root: Path, logs: Path, tag: str, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(logs), "--logging_tag", tag,
            f"data.root={root}", "data.synthetic=null", "data.num_classes=4", "data.crop_size=48",
            "data.val_size=48", "data.batch_size=4", "data.num_workers=0", "train.epochs=1", "train.num_vis=0",
            *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One epoch of 2 iterations: latest_ckpt.pth and best_ckpt.pth."""
    import main as main_mod
    base = tmp_path_factory.mktemp("safe")
    root = base / "data"
    make_synthetic_voc(root, train=8, val=2, test=2, size=(48, 48), classes=3, seed=0)
    assert main_mod.main(_train_args(root, base / "logs", "run")) == 0
    return base / "logs" / "run"


def _main(*args: str) -> subprocess.CompletedProcess:
    """main.py as users run it: what reaches the console, exactly."""
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, env=ENV,
                          timeout=240)


def _main_here(*args: str) -> SimpleNamespace:
    """main.main in this process (no interpreter and torch start per call): its exit code and
    what it printed on stderr."""
    import main as main_mod
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main_mod.main(list(args))
    return SimpleNamespace(returncode=rc, stderr=err.getvalue())


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    return errors[0]


def test_every_checkpoint_a_run_writes_loads_weights_only(run):
    latest = torch.load(run / ckpt_io.LATEST, weights_only=True)
    assert latest["iteration"] == 2 and set(latest) >= {"optimizer", "scheduler", "scaler", "rng", "config"}
    best = torch.load(run / ckpt_io.BEST, weights_only=True)
    assert sorted(best["net_state_dict"]) == list(ckpt_io.NET_NAMES)
    # What the resume restores: the streams as they were when the checkpoint was written.
    state = latest["rng"][0]
    ckpt_io.set_rng_state(state)
    first = _draws()
    ckpt_io.set_rng_state(torch.load(run / ckpt_io.LATEST, weights_only=True)["rng"][0])
    assert _draws() == first


def test_a_checkpoint_holding_pickled_objects_is_refused_unless_trusted(run, tmp_path):
    best = torch.load(run / ckpt_io.BEST, weights_only=True)
    path = tmp_path / "foreign.pth"
    torch.save({**best, "extra": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load(path)
    assert str(e.value).startswith(f"{path} holds pickled Python objects (")
    assert "--trust-checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert UNPICKLED == []  # refused before any of the file's code ran
    assert sorted(ckpt_io.load(path, trust=True)["net_state_dict"]) == list(ckpt_io.NET_NAMES)
    assert UNPICKLED == ["ran"]


def test_a_tensor_file_as_ckpt_is_one_line_exit_1_for_resume_and_test(run, tmp_path):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    root = run.parents[1] / "data"
    expected = f"error: {tensor} is not a checkpoint: it holds a tensor of shape (3,), not a dict with 'net_state_dict'"
    r = _main(*_train_args(root, tmp_path / "logs", "resume"), "--ckpt", str(tensor))
    assert r.returncode == 1 and _one_error_line(r.stderr) == expected
    r = _main_here(*_train_args(root, tmp_path / "logs", "test"), "--test", "--ckpt", str(tensor))
    assert r.returncode == 1 and _one_error_line(r.stderr) == expected


def test_a_foreign_checkpoint_needs_trust_checkpoint_for_test(run, tmp_path, caplog):
    """A released file that also saved its training script's arguments (argparse.Namespace)."""
    import argparse
    best = torch.load(run / ckpt_io.BEST, weights_only=True)
    path = tmp_path / "released.pth"
    torch.save({**best, "args": argparse.Namespace(lr=0.01)}, path)
    root = run.parents[1] / "data"
    args = [*_train_args(root, tmp_path / "logs", "foreign"), "--test", "--ckpt", str(path)]
    r = _main_here(*args)
    assert r.returncode == 1, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert line.startswith(f"error: {path} holds pickled Python objects (argparse.Namespace)")
    assert "pass --trust-checkpoint" in line
    assert not (tmp_path / "logs" / "foreign").exists()  # nothing written
    r = _main_here(*args, "--trust-checkpoint")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--trust-checkpoint: loading {path} with full unpickling" in caplog.text


def test_a_checkpoint_of_an_earlier_version_resumes_only_with_trust_checkpoint(run, tmp_path):
    """Resumable checkpoints used to hold numpy's RNG state as a numpy array."""
    import main as main_mod
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "train_log.jsonl", "val_log.jsonl"):
        shutil.copy(run / name, old / name)
    state = torch.load(run / ckpt_io.LATEST, weights_only=True)
    for rng in state["rng"]:
        np.random.set_state({**rng["numpy"], "state": {**rng["numpy"]["state"],
                                                       "key": rng["numpy"]["state"]["key"].numpy().astype(np.uint32)}})
        rng["numpy"] = np.random.get_state()  # the tuple with its uint32 array, as written before
    torch.save(state, old / ckpt_io.LATEST)
    before = (old / ckpt_io.LATEST).read_bytes()
    root = run.parents[1] / "data"
    args = [*_train_args(root, tmp_path, "x", "train.epochs=2"), "--allow-config-change",
            "--ckpt", str(old / ckpt_io.LATEST)]
    r = _main_here(*args)
    assert r.returncode == 1
    line = _one_error_line(r.stderr)
    assert "numpy" in line and "pass --trust-checkpoint" in line and str(old / ckpt_io.LATEST) in line
    assert (old / ckpt_io.LATEST).read_bytes() == before
    assert main_mod.main([*args, "--trust-checkpoint"]) == 0
    resumed = torch.load(old / ckpt_io.LATEST, weights_only=True)  # written anew: weights-only from now on
    assert resumed["iteration"] == 4 and isinstance(resumed["rng"][0]["numpy"], dict)


# ----------------------------------------------------------------------------- other loaders

def test_pretrained_weights_with_pickled_objects_are_refused_by_config_key(tmp_path):
    from models.checkpoint import load_pretrained
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError, match=r"^config key 'model.backbone.pretrained': .*imagenet\.pth holds "
                                              r"pickled Python objects \([\w.]*_note\) and loading them can run code"):
        load_pretrained(torch.nn.Linear(1, 1), path, lambda sd: dict(sd), "model.backbone.pretrained")
    assert UNPICKLED == []


def test_a_score_file_holding_pickled_objects_is_refused_not_unpickled(tmp_path):
    from irn.step.gen_mask import ScoreFileError, load_score
    path = tmp_path / "a.pt"
    torch.save({"pred": torch.zeros(2, 2, dtype=torch.long), "score": torch.zeros(2, 2, 2), "x": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(ScoreFileError, match=r"score file for id 'a' is unreadable: .*a\.pt holds pickled Python "
                                             r"objects \(.*\) and loading them can run code"):
        load_score(path)
    assert UNPICKLED == []


# ----------------------------------------------------------------------------- file permissions

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_get_the_permissions_open_would_give(tmp_path, umask, mode):
    from utils.io import save_json, save_text
    previous = os.umask(umask)
    try:
        paths = [save_text(tmp_path / "a.txt", "x"), save_json(tmp_path / "b.json", {}),
                 ckpt_io.save(tmp_path / "c.pth", {"a": torch.ones(1)})]
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(previous)
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode
    assert [p.stat().st_mode & 0o777 for p in paths] == [mode] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.pth", "plain.txt"]  # no temporaries

"""The one provenance rule (utils/provenance.py): the reuse matrix of the record itself, then the
tools that follow it, on the cases that did harm before it: test.py kept predictions of another
checkpoint's maps, ``main.py --test --overwrite`` deleted maps before finding that the checkpoint
did not fit, and a second ``--test`` into a training folder lost the training's config."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import checkpoint as ckpt_io
from tests.conftest import REPO, eval_nets
from utils import provenance
from engine.config import load_config
from utils.errors import OutputExistsError

# ----------------------------------------------------------------------------- the record itself


def _record(settings: dict, ckpt: Path) -> dict:
    return provenance.make_record("tool", {"checkpoint": provenance.file_input(ckpt)}, settings)


@pytest.fixture
def made(tmp_path):
    """A folder made by the tool from ``a.pth`` with scale 1, holding two outputs and a user's note."""
    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"weights A")
    out = tmp_path / "out"
    provenance.prepare(out, _record({"scale": 1}, ckpt), ("*.npy",), overwrite=False)
    for name in ("x.npy", "y.npy", "notes.txt"):
        (out / name).write_text(name)
    return out, ckpt


def test_same_record_is_reused_and_nothing_is_touched(made):
    out, ckpt = made
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    p = provenance.prepare(out, _record({"scale": 1}, ckpt), ("*.npy",), overwrite=False)
    assert p.action == "reuse" and p.reuse
    assert {q.name: q.stat().st_mtime_ns for q in out.iterdir()} == before


def test_the_same_content_elsewhere_is_the_same_input(made, tmp_path):
    out, ckpt = made
    copy = tmp_path / "elsewhere" / "copy.pth"
    copy.parent.mkdir()
    copy.write_bytes(ckpt.read_bytes())
    assert provenance.plan(out, _record({"scale": 1}, copy), ("*.npy",), overwrite=False).action == "reuse"


@pytest.mark.parametrize("change", ["settings", "checkpoint"])
def test_other_settings_or_inputs_are_refused_naming_both_values(made, tmp_path, change):
    out, ckpt = made
    other = tmp_path / "b.pth"
    other.write_bytes(b"weights B")
    record = _record({"scale": 2}, ckpt) if change == "settings" else _record({"scale": 1}, other)
    with pytest.raises(OutputExistsError) as err:
        provenance.plan(out, record, ("*.npy",), overwrite=False)
    text = str(err.value)
    assert str(out / provenance.RECORD_NAME) in text and "--overwrite" in text
    if change == "settings":
        assert "settings.scale: 1 -> 2" in text
    else:
        assert f"inputs.checkpoint.sha256: '{provenance.sha256(ckpt)}' -> '{provenance.sha256(other)}'" in text
    assert sorted(p.name for p in out.iterdir()) == ["_provenance.json", "notes.txt", "x.npy", "y.npy"]


def test_overwrite_deletes_only_the_tools_outputs_and_only_at_commit(made, tmp_path):
    out, ckpt = made
    other = tmp_path / "b.pth"
    other.write_bytes(b"weights B")
    p = provenance.plan(out, _record({"scale": 1}, other), ("*.npy",), overwrite=True)
    assert p.action == "replace"
    assert (out / "x.npy").is_file()  # planning deletes nothing: the tool's other checks come first
    provenance.commit(p)
    assert sorted(q.name for q in out.iterdir()) == ["_provenance.json", "notes.txt"]
    assert provenance.read_record(out / provenance.RECORD_NAME)["inputs"]["checkpoint"]["sha256"] == \
        provenance.sha256(other)


@pytest.mark.parametrize("overwrite", [False, True])
def test_outputs_without_a_record_are_never_reused_or_deleted(tmp_path, overwrite):
    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"weights A")
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "x.npy").write_text("someone's")
    with pytest.raises(OutputExistsError, match="no _provenance.json saying what made them"):
        provenance.prepare(out, _record({"scale": 1}, ckpt), ("*.npy",), overwrite=overwrite)
    assert (out / "x.npy").read_text() == "someone's"


def test_a_folder_of_other_files_only_is_used_and_its_files_kept(tmp_path):
    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"weights A")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README").write_text("mine")
    assert provenance.prepare(tmp_path / "out", _record({}, ckpt), ("*.npy",), overwrite=False).action == "new"
    assert (tmp_path / "out" / "README").read_text() == "mine"


def test_an_upstream_remade_makes_the_downstream_record_differ(made, tmp_path):
    out, ckpt = made
    before = provenance.folder_input(out)
    other = tmp_path / "b.pth"
    other.write_bytes(b"weights B")
    provenance.prepare(out, _record({"scale": 1}, other), ("*.npy",), overwrite=True)
    assert provenance.folder_input(out)["record"] != before["record"]
    # Without a record, a rewritten file changes the listing.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "m.npy").write_text("1")
    first = provenance.folder_input(foreign, ("*.npy",))
    (foreign / "m.npy").write_text("22")
    assert provenance.folder_input(foreign, ("*.npy",))["listing"] != first["listing"]


def test_moved_versions_are_numbered_never_one_previous(tmp_path):
    path = tmp_path / "config.yaml"
    for text in ("training\n", "test A\n", "test A\n", "test B\n"):
        provenance.keep_numbered(path, text)
    assert path.read_text() == "test B\n"
    assert (tmp_path / "config.1.yaml").read_text() == "training\n"
    assert (tmp_path / "config.2.yaml").read_text() == "test A\n"
    assert not (tmp_path / "config.3.yaml").exists()


# ----------------------------------------------------------------------------- main.py --test and test.py

NUM_CLASSES = 4
OVERRIDES = ["data.synthetic=null", f"data.num_classes={NUM_CLASSES}", "data.crop_size=64", "data.val_size=64",
             "data.num_workers=0"]


@pytest.fixture(scope="module")
def syn_root(synthetic_set) -> Path:
    return synthetic_set("voc", train=2, val=4, test=0, size=(64, 64), classes=NUM_CLASSES - 1, seed=3)


def _cfg(root: Path, num_classes: int = NUM_CLASSES):
    return load_config(REPO / "configs/demo.yaml", [f"data.root={root}", *OVERRIDES, f"data.num_classes={num_classes}"])


def _main(root: Path, logs: Path, ckpt: Path, *extra: str) -> tuple[int, str]:
    import main as main_mod
    err = io.StringIO()
    argv = ["--config", str(REPO / "configs/demo.yaml"), "--test", "--ckpt", str(ckpt), "--logging_path_base",
            str(logs), "--logging_tag", "run", f"data.root={root}", *OVERRIDES, *extra]
    with contextlib.redirect_stderr(err):
        rc = main_mod.main(argv)
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def cli():
    """test.py as a module, as tests/cli/test_test_py.py loads it."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    spec = importlib.util.spec_from_file_location("beco_test_cli_provenance", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    yield module
    sys.modules.pop(spec.name, None)


def _test_py(cli, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_torch_thread")
def test_predictions_of_replaced_maps_are_refused_then_remade(syn_root, tmp_path, cli):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    ckpt_io.save_best(a, eval_nets(_cfg(syn_root), 0))
    ckpt_io.save_best(b, eval_nets(_cfg(syn_root), 1))
    logits = tmp_path / "run" / "logits"
    assert _main(syn_root, tmp_path, a)[0] == 0
    rc, out, err = _test_py(cli, "--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1")
    assert rc == 0, err
    first = {p.name: p.read_bytes() for p in (tmp_path / "run" / "val_pred").glob("*.png")}

    rc, err = _main(syn_root, tmp_path, b, "--overwrite")
    assert rc == 0, err[-2000:]
    # Before: "0 written, 4 kept", and the card showed a stale averaged row.
    rc, out, err = _test_py(cli, "--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1")
    assert rc == 1 and "inputs.score_maps.record" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "val_pred").glob("*.png")} == first
    rc, out, err = _test_py(cli, "--logits_dir", str(logits), "--mode", "val", "--n-jobs", "1", "--overwrite")
    assert rc == 0 and "4 predictions written, 0 already there" in out, out + err
    # The remade predictions are b's: the same as a fresh folder made from b's maps.
    fresh = tmp_path / "fresh"
    assert _main(syn_root, fresh, b)[0] == 0
    assert _test_py(cli, "--logits_dir", str(fresh / "run" / "logits"), "--mode", "val", "--n-jobs", "1")[0] == 0
    for p in (fresh / "run" / "val_pred").glob("*.png"):
        assert (tmp_path / "run" / "val_pred" / p.name).read_bytes() == p.read_bytes()


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_torch_thread")
def test_overwrite_with_a_checkpoint_that_does_not_fit_deletes_nothing(syn_root, tmp_path):
    good, wrong = tmp_path / "good.pth", tmp_path / "wrong.pth"
    ckpt_io.save_best(good, eval_nets(_cfg(syn_root), 0))
    ckpt_io.save_best(wrong, eval_nets(_cfg(syn_root, NUM_CLASSES + 1), 0))
    assert _main(syn_root, tmp_path, good)[0] == 0
    logits = tmp_path / "run" / "logits"
    before = {p.name: p.stat().st_mtime_ns for p in logits.iterdir()}
    assert len(before) == 5  # four maps and the record
    rc, err = _main(syn_root, tmp_path, wrong, "--overwrite")
    assert rc == 1 and "shape mismatch" in err and str(wrong) in err, err[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in logits.iterdir()} == before


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_torch_thread")
def test_test_runs_into_a_training_folder_keep_every_config(syn_root, tmp_path):
    ckpt = tmp_path / "run" / "best_ckpt.pth"
    ckpt.parent.mkdir()
    ckpt_io.save_best(ckpt, eval_nets(_cfg(syn_root), 0))
    (tmp_path / "run" / "config.yaml").write_text("the training's config\n")
    assert _main(syn_root, tmp_path, ckpt)[0] == 0
    assert _main(syn_root, tmp_path, ckpt, "test.flip=true")[0] == 0
    run = tmp_path / "run"
    assert (run / "config.1.yaml").read_text() == "the training's config\n"
    assert load_config(run / "config.2.yaml").test.flip is False
    assert load_config(run / "config.yaml").test.flip is True
    assert np.all([p.is_file() for p in (run / "logits").glob("*.npy")])


def test_a_folder_of_an_earlier_version_is_refused_then_replaced_with_overwrite(tmp_path):
    """Maps and predictions made before records carry the old tool's ``_settings.json``: the
    folder is the tool's own, but what made it is unknown."""
    ckpt = tmp_path / "a.pth"
    ckpt.write_bytes(b"weights A")
    out = tmp_path / "logits"
    out.mkdir()
    (out / "_settings.json").write_text("{}")
    (out / "x.npy").write_text("old")
    with pytest.raises(OutputExistsError, match=r"tool: 'an earlier version \(_settings\.json\)' -> 'tool'"):
        provenance.plan(out, _record({}, ckpt), ("*.npy",), overwrite=False, legacy="_settings.json")
    provenance.prepare(out, _record({}, ckpt), ("*.npy",), overwrite=True, legacy="_settings.json")
    assert sorted(p.name for p in out.iterdir()) == ["_provenance.json"]

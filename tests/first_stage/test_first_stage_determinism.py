"""First stage: --determ repeats train_cam bit for bit on one machine, and reaches the demo's YAML."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_voc(synthetic_set) -> Path:
    return synthetic_set("voc", train=8, val=2, test=1, size=(48, 64), classes=3, seed=3) / "VOC2012"


@pytest.fixture
def restore_torch_switches():
    """--determ flips process-wide torch switches; give the next tests the ones they had."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.mkldnn.deterministic, torch.get_num_threads())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.mkldnn.deterministic = saved[4]
    torch.set_num_threads(saved[5])


def _train_cam(root: Path, work: Path) -> Path:
    from irn import run_sample
    run_sample.main(["--voc12_root", str(root), "--work_dir", str(work), "--steps", "train_cam", "--determ",
                     "--backbone_depth", "18", "--backbone_bn", "batch", "--cam_freeze_until", "none",
                     "--cam_crop_size", "32", "--cam_resize_long", "32,48", "--cam_batch_size", "4",
                     "--cam_num_epoches", "1", "--cam_val_loss", "false", "--num_workers", "0",
                     "--torch_threads", "1", "--seed", "4", "--device", "cpu", "--no_progress"])
    return work / "sess" / "res18_cam.pth"


@pytest.mark.filterwarnings("ignore::UserWarning")  # no ImageNet weights: trained from scratch, as meant
def test_determ_train_cam_is_bit_identical(tmp_path, tiny_voc, restore_torch_switches):
    a = _train_cam(tiny_voc, tmp_path / "a")
    b = _train_cam(tiny_voc, tmp_path / "b")
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert list(wa) == list(wb)
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"weights differ between two --determ runs: {differing[:5]}"
    # The files too: saved through a file object, so no random temp name inside the zip.
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    logs = [json.loads((tmp_path / r / "logs" / "train_cam.json").read_text()) for r in ("a", "b")]
    assert logs[0] == logs[1]

    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["config"]["determ"] is True
    runtime = summary["runtime"]
    assert runtime["determ"] is True and runtime["deterministic_algorithms"] is True
    assert runtime["cudnn_deterministic"] is True and runtime["cudnn_benchmark"] is False
    assert runtime["torch_threads"] == 1 and runtime["cpu_capability"]
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()


def test_determ_is_off_by_default_and_a_demo_yaml_switch(tmp_path):
    from tools import demo
    from irn import run_sample
    assert run_sample.parse_args(["--work_dir", str(tmp_path)]).determ is False
    assert demo.first_stage_settings(REPO / "configs/first_stage/demo.yaml").determ is True
    assert run_sample.parse_args(["--work_dir", str(tmp_path), "--determ"]).determ is True
    demo_file = ["--config", str(REPO / "configs/first_stage/demo.yaml"), "--work_dir", str(tmp_path)]
    assert run_sample.parse_args(demo_file).determ is True
    assert run_sample.parse_args(demo_file + ["determ=false"]).determ is False

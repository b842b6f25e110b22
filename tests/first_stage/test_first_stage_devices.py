"""First stage: which GPUs the training steps use, the inference shards' loader workers, and the
CUDA cache before the shards start. Everything here runs without CUDA (counts are parameters,
CUDA calls are stubbed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irn.misc import runtime
from utils.errors import DeviceError

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield


# ----------------------------------------------------------------------------- training GPUs


@pytest.mark.parametrize("device, gpus, expected", [
    ("cuda", 4, [0, 1, 2, 3]),   # all visible GPUs: DataParallel, as the reference
    ("auto", 4, [0, 1, 2, 3]),
    ("cuda", 1, [0]),
    ("cuda:2", 4, [2]),          # that GPU alone
    ("cuda:0", 4, [0]),
    (torch.device("cuda", 3), 4, [3]),
    ("cpu", 4, []),
    ("cpu", 0, []),
    ("auto", 0, []),
])
def test_training_gpus(device, gpus, expected):
    assert runtime.training_gpus(device, gpus) == expected


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda:5", 2, r"^--device cuda:5: this machine has 2 CUDA device\(s\)$"),
    ("cuda", 0, r"^--device cuda requested but CUDA is not available$"),
    ("cuda:0", 0, r"^--device cuda:0 requested but CUDA is not available$"),
    ("tpu0", 2, r"^--device 'tpu0' is not a device"),
])
def test_training_gpus_errors_name_the_flag(device, gpus, message):
    with pytest.raises(DeviceError, match=message):
        runtime.training_gpus(device, gpus)


class _Recorder:
    def __init__(self, events: list, name: str, result=None):
        self.events, self.name, self.result = events, name, result

    def __call__(self, *args, **kwargs):
        self.events.append((self.name, args, kwargs))
        return self.result


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine with 4 GPUs as far as the training helper can tell; DataParallel recorded."""
    events: list = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", _Recorder(events, "set_device"))
    monkeypatch.setattr(torch.nn, "DataParallel", _Recorder(events, "DataParallel", result="wrapped"))
    return events


def test_one_named_gpu_trains_without_data_parallel(four_gpus):
    model = torch.nn.Linear(2, 2)
    assert runtime.wrap_for_training(model, torch.device("cuda", 2)) is model
    # The current device becomes GPU 2, so pinned-memory threads and cuDNN handles stay off GPU 0.
    assert four_gpus == [("set_device", (torch.device("cuda", 2),), {})]


def test_all_gpus_train_through_data_parallel(four_gpus):
    model = torch.nn.Linear(2, 2)
    assert runtime.wrap_for_training(model, torch.device("cuda")) == "wrapped"
    assert four_gpus == [("DataParallel", (model,), {"device_ids": [0, 1, 2, 3]})]


def test_cpu_training_is_not_wrapped(four_gpus):
    model = torch.nn.Linear(2, 2)
    assert runtime.wrap_for_training(model, torch.device("cpu")) is model
    assert four_gpus == []


# ----------------------------------------------------------------------------- shard loader workers


@pytest.mark.parametrize("num_workers, n_parts, expected", [
    (0, 1, 0), (0, 4, 0),        # the user asked for in-process loading
    (4, 1, 4), (8, 1, 8),
    (2, 2, 1), (8, 2, 4), (8, 3, 2),
    (1, 2, 1), (3, 8, 1),        # a share never drops to 0 when workers were asked for
])
def test_shard_workers(num_workers, n_parts, expected):
    assert runtime.shard_workers(num_workers, n_parts) == expected


@pytest.fixture(scope="module")
def tiny_voc(synthetic_set) -> Path:
    return synthetic_set("voc", train=4, val=1, test=1, size=(32, 40), classes=2, seed=5) / "VOC2012"


def _args(voc: Path, work: Path, *extra: str):
    from irn import run_sample
    return run_sample.parse_args(["--voc12_root", str(voc), "--work_dir", str(work), "--device", "cpu",
                                  "--backbone_depth", "18", "--cam_scales", "1.0,0.5", "--torch_threads", "1",
                                  "--no_progress", *extra])


@pytest.mark.parametrize("step_name, builder", [("make_cam", "build_cam_infer_net"),
                                                ("make_sem_seg_labels", "build_inference_net")])
@pytest.mark.parametrize("num_workers, expected", [(2, 1), (0, 0)])
def test_a_shard_loads_with_its_share_of_workers(step_name, builder, num_workers, expected, tiny_voc, tmp_path,
                                                 monkeypatch):
    import importlib
    step = importlib.import_module(f"irn.step.{step_name}")
    args = _args(tiny_voc, tmp_path / "work", "--num_workers", str(num_workers))
    loaders: list = []

    def loader(dataset, **kwargs):
        loaders.append(kwargs["num_workers"])
        return []  # nothing to infer: only the loader's settings are under test

    monkeypatch.setattr(step, builder, lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    step._work(0, 2, args, (tiny_voc / "ImageSets/Segmentation/train_aug.txt").read_text().split())
    assert loaders == [expected]


def test_cam_files_do_not_depend_on_shards_or_workers(tiny_voc, tmp_path):
    """make_cam in-process without workers vs 2 spawned shards with a loader worker each."""
    from irn import run_sample
    from irn.net.backbone import resnet
    from irn.net.resnet50_cam import CAM
    torch.manual_seed(0)
    state = CAM(backbone=resnet(18), n_classes=20).state_dict()
    outputs = {}
    for name, extra in (("plain", ["--num_workers", "0"]), ("sharded", ["--num_workers", "2", "--cpu_shards", "2"])):
        work = tmp_path / name
        (work / "sess").mkdir(parents=True)
        torch.save(state, work / "sess" / "res18_cam.pth")
        res = run_sample.main(["--voc12_root", str(tiny_voc), "--work_dir", str(work), "--device", "cpu",
                               "--backbone_depth", "18", "--cam_scales", "1.0,0.5", "--torch_threads", "1",
                               "--no_progress", "--steps", "make_cam", *extra])
        assert res["make_cam"]["written"] == 4
        outputs[name] = {p.name: p.read_bytes() for p in sorted((work / "result" / "cam").glob("*.npy"))}
    assert len(outputs["plain"]) == 4 and outputs["plain"] == outputs["sharded"]


# ----------------------------------------------------------------------------- CUDA cache before the shards


@pytest.mark.parametrize("initialised", [True, False])
def test_run_on_devices_empties_the_cuda_cache_before_spawning(monkeypatch, initialised):
    from types import SimpleNamespace
    events: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "empty_cache", _Recorder(events, "empty_cache"))
    monkeypatch.setattr(torch.multiprocessing, "spawn", _Recorder(events, "spawn"))
    args = SimpleNamespace(device="cpu", cpu_shards=2)
    runtime.run_on_devices(lambda *a: events.append(("in-process",)), args, ["a", "b", "c"])
    names = [e[0] for e in events]
    assert names == (["empty_cache", "spawn"] if initialised else ["spawn"])
    assert events[-1][2]["nprocs"] == 2


def test_one_part_runs_in_process_without_touching_the_cache(monkeypatch):
    from types import SimpleNamespace
    events: list = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", _Recorder(events, "empty_cache"))
    monkeypatch.setattr(torch.multiprocessing, "spawn", _Recorder(events, "spawn"))
    runtime.run_on_devices(lambda *a: events.append(("in-process", a[:2])), SimpleNamespace(device="cpu", cpu_shards=1),
                           ["a"])
    assert events == [("in-process", (0, 1))]

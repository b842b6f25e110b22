"""Process-wide settings reach every command the same way: --determ's cuBLAS workspace is set
before CUDA and the process group start (training and testing), `main.py --test` gets the
training's backend settings and memory layout, and the training step builds no host constant
per iteration (each one is a blocking host-to-device copy on a GPU)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt_io
from tests.conftest import REPO, eval_nets
from engine.config import load_config
from utils.errors import BecoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OVERRIDES = ["data.synthetic=null", "data.num_classes=4", "data.crop_size=48", "data.val_size=48",
             "data.batch_size=2", "data.num_workers=0", "train.epochs=1", "train.num_vis=0"]


@pytest.fixture(scope="module")
def syn_root(synthetic_set) -> Path:
    return synthetic_set("voc", train=4, val=2, test=0, size=(48, 48), classes=3, seed=1)


@pytest.fixture(scope="module")
def best_ckpt(syn_root, tmp_path_factory) -> Path:
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={syn_root}", *OVERRIDES])
    path = tmp_path_factory.mktemp("ckpt") / "best_ckpt.pth"
    ckpt_io.save_best(path, eval_nets(cfg, 0))
    return path


class _Stop(BecoError):
    """Raised by the stand-in init_distributed: the test has seen what it needed."""


def _run_main(argv: list[str]) -> tuple[int, str]:
    import main as main_mod
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main_mod.main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("command", ["train", "test"])
def test_determ_sets_cublas_workspace_before_the_process_group_starts(syn_root, best_ckpt, tmp_path, monkeypatch,
                                                                      command):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts; set after CUDA and NCCL are up (as
    training did), --determ left cuBLAS's split-K reductions run-dependent."""
    import engine.inference
    import engine.trainer
    seen = {}

    def init_distributed(*args, **kwargs):
        seen["CUBLAS_WORKSPACE_CONFIG"] = __import__("os").environ.get("CUBLAS_WORKSPACE_CONFIG")
        raise _Stop("stopped by the test")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(engine.trainer, "init_distributed", init_distributed)  # where training and testing call it
    monkeypatch.setattr(engine.inference, "init_distributed", init_distributed)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    argv = ["--config", str(REPO / "configs/demo.yaml"), "--determ", "--logging_path_base", str(tmp_path),
            "--logging_tag", "determ", f"data.root={syn_root}", *OVERRIDES]
    if command == "test":
        argv += ["--test", "--ckpt", str(best_ckpt)]
    code, err = _run_main(argv)
    assert code == 1 and "stopped by the test" in err
    assert seen == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_testing_uses_the_training_backend_settings_and_memory_layout(syn_root, best_ckpt, tmp_path, monkeypatch):
    """`main.py --test` skipped configure_backends: no cuDNN autotuning, no TF32, and nets
    trained channels_last got NCHW inputs (a copy per layer on tensor cores)."""
    import engine.inference as inference
    seen = []
    real = inference.predict_variants

    def spy(nets, images, cfg, *args, **kwargs):
        seen.append([n.conv1.weight.is_contiguous(memory_format=torch.channels_last)
                     if hasattr(n, "conv1") else next(p for p in n.parameters() if p.dim() == 4)
                     .is_contiguous(memory_format=torch.channels_last) for n in nets])
        return real(nets, images, cfg, *args, **kwargs)
    forward_inputs = []
    monkeypatch.setattr(inference, "predict_variants", spy)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: forward_inputs.append(args[0].is_contiguous(memory_format=torch.channels_last))
        if module.__class__.__name__ in ("DeepLabV3Plus", "DeepLabV2", "SegFormer") and args else None)
    try:
        code, err = _run_main(["--config", str(REPO / "configs/demo.yaml"), "--test", "--ckpt", str(best_ckpt),
                               "--logging_path_base", str(tmp_path), "--logging_tag", "layout",
                               f"data.root={syn_root}", *OVERRIDES, "train.channels_last=true",
                               "train.cudnn_benchmark=true", "train.allow_tf32=true"])
        after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    finally:
        hook.remove()
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert code == 0, err
    assert after == (True, True, True)
    assert seen and all(all(layouts) for layouts in seen)  # the nets in NHWC
    assert forward_inputs and all(forward_inputs)  # and every input they got


# ----------------------------------------------------------------------------- host constants

class _HostConstants(torch.overrides.TorchFunctionMode):
    """Counts tensors built from Python values (``torch.tensor``, ``new_tensor``, ``as_tensor``):
    on a GPU each is a blocking copy that waits for all queued work."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tensor", "new_tensor", "as_tensor"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("per_image", [True, False], ids=["cpu-path", "batched-gpu-path"])
def test_strong_augmentation_builds_its_constants_once(per_image):
    from engine.strong_aug import strong_augment
    cfg = load_config(REPO / "configs/beco_voc.yaml").method.strong_aug
    x = torch.rand(4, 3, 16, 16)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    every_step = dataclasses.replace(cfg, color_prob=1.0, gray_prob=1.0, blur_prob=1.0)
    strong_augment(x, every_step, torch.Generator().manual_seed(0), per_image=per_image, mean=mean, std=std)  # warm
    with _HostConstants() as seen:
        for seed in range(3):
            strong_augment(x, cfg, torch.Generator().manual_seed(seed), per_image=per_image, mean=mean, std=std)
    assert seen.calls == []


def test_a_training_step_builds_no_host_constant_after_the_first(syn_root):
    """The BECO step past warm-up (online labels, mixing, strong augmentation, both nets, the
    loss): the only host transfer it may make is the class-presence matrix, device to host."""
    from datasets.segmentation import TrainSet
    from engine.beco import training_step
    from engine.build import build_nets
    from utils.distributed import DistInfo
    from utils.runtime import make_autocast
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={syn_root}", *OVERRIDES, "method.warmup_epochs=0"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    nets = build_nets(cfg, info)
    data = TrainSet(cfg.data)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    autocast = make_autocast(cfg, info.device)
    # Warm up with every augmentation step drawn, so every constant has been built once.
    every_step = dataclasses.replace(cfg.method.strong_aug, color_prob=1.0, gray_prob=1.0, blur_prob=1.0)
    warm = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, strong_aug=every_step))
    training_step(nets, batch, 1, warm, autocast, info.device)
    with _HostConstants() as seen:
        losses = training_step(nets, batch, 1, cfg, autocast, info.device)
    assert seen.calls == []
    assert set(losses) >= {"total", "ce1", "cot1"}

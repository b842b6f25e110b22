"""Runtime plumbing shared by the steps: logger, progress bars, device, work splitting."""
from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.views import data_source
from utils.errors import DeviceError, OptionError
from utils.io import atomic_write
from utils.runtime import cpu_info, seeded_loader_kwargs, set_deterministic
from utils.schedule import PolyOptimizer, max_steps

LOGGER_NAME = "first_stage"
T = TypeVar("T")


def get_logger() -> logging.Logger:
    """The pipeline logger; the driver attaches the console and ``<work_dir>/log.txt`` handlers.

    Without the driver (tests, library use) messages go to stderr at INFO level.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
    return logger


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             unit: str = "img", position: int | None = None) -> Iterable[T]:
    """A tqdm bar (stderr) per step; plain iteration when disabled."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, position=position,
                leave=position in (None, 0))


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    return _checked_device(name, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _checked_device(name: str | torch.device, gpu_count: int) -> torch.device:
    """``--device`` on a machine with ``gpu_count`` CUDA devices; DeviceError for one it lacks."""
    if name == "auto":
        return torch.device("cuda" if gpu_count else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cuda" and gpu_count == 0:
        raise DeviceError(f"--device {name} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= gpu_count:
        raise DeviceError(f"--device {name}: this machine has {gpu_count} CUDA device(s)")
    return dev


def training_gpus(device: str | torch.device, gpu_count: int) -> list[int]:
    """The GPU ids a training step runs on: every visible one for ``cuda``/``auto`` (the
    reference's DataParallel), only N for ``cuda:N``, none on the CPU."""
    dev = _checked_device(device, gpu_count)
    if dev.type != "cuda":
        return []
    return list(range(gpu_count)) if dev.index is None else [dev.index]


def wrap_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` (already on ``device``) as the training steps call it: DataParallel over
    :func:`training_gpus` when there are several, else the model itself."""
    gpus = training_gpus(device, torch.cuda.device_count() if device.type == "cuda" else 0)
    if device.type == "cuda" and device.index is not None:
        # The loader's pin-memory thread and cuDNN work on the current device: without this,
        # --device cuda:N would also open a context on GPU 0.
        torch.cuda.set_device(device)
    return torch.nn.DataParallel(model, device_ids=gpus) if len(gpus) > 1 else model


def training_setup(model: torch.nn.Module, head_lr_mult: float, lr: float, weight_decay: float, max_step: int,
                   args: Any, device: torch.device) -> tuple[PolyOptimizer, torch.nn.Module]:
    """train_cam's and train_irn's set-up: the model's two parameter groups (``param_groups()``:
    the pretrained part, then the new head at ``head_lr_mult`` times ``lr``) under the poly SGD,
    the model on ``device`` in training mode, and what the step calls (:func:`wrap_for_training`)."""
    pretrained, head = model.param_groups()
    optimizer = PolyOptimizer([{"params": pretrained, "lr_mult": 1.0}, {"params": head, "lr_mult": head_lr_mult}],
                              lr=lr, weight_decay=weight_decay, max_step=max_step, momentum=args.sgd_momentum,
                              power=args.poly_power)
    model.to(device)
    net = wrap_for_training(model, device)
    model.train()
    return optimizer, net


def training_loader(dataset: torch.utils.data.Dataset, batch_size: int, epochs: int, args: Any,
                    device: torch.device, step: str, batch_flag: str) -> tuple[DataLoader, int]:
    """A training step's shuffled, seeded loader (full batches only) and its number of optimiser
    steps. A batch larger than the data set is refused: there would be no full batch to train on."""
    if len(dataset) < batch_size:
        raise OptionError(f"{step}: {len(dataset)} training images < batch size {batch_size}; lower --{batch_flag}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda", **seeded_loader_kwargs(args.seed, args.num_workers))
    return loader, max_steps(len(dataset), batch_size, epochs)


def shard_workers(num_workers: int, n_parts: int) -> int:
    """DataLoader workers of one of ``n_parts`` inference shards: its share of ``--num_workers``,
    at least one so a GPU shard does not decode its own images; 0 when the user asked for 0."""
    if num_workers <= 0:
        return 0
    return max(1, num_workers // max(1, n_parts))


def round_robin(items: Sequence[T], n_parts: int, part: int) -> list[T]:
    """Part ``p`` of ``n`` gets items p, p+n, p+2n, … (the reference's split, §1)."""
    return list(items[part::n_parts])


def worker_share(device_name: str, part: int, n_parts: int, items: Sequence[T],
                 cpu_threads: int | None = None) -> tuple[torch.device, list[T]]:
    """The device and the round-robin share of ``items`` of inference worker ``part``.

    With several GPUs worker p drives GPU p; on the CPU the processes share the cores
    (``cpu_threads`` torch threads each, default cpu_count // n_parts). Results do not depend
    on the split.
    """
    device = resolve_device(device_name)
    if device.type == "cuda" and n_parts > 1:
        device = torch.device("cuda", part)
        torch.cuda.set_device(device)
    elif device.type == "cpu" and n_parts > 1:
        torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // n_parts))
    return device, round_robin(items, n_parts, part)


def inference_parts(args: Any) -> int:
    """How many processes an inference step (make_cam, make_sem_seg) spreads its ids over: one per
    visible GPU (``--device auto|cuda``), else ``--cpu_shards`` on the CPU (1: in-process)."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        return torch.cuda.device_count() if args.device in ("auto", "cuda") else 1
    return args.cpu_shards


def run_on_devices(work: Any, args: Any, ids: list) -> None:
    """Call ``work(part, n_parts, args, ids)`` once per GPU / CPU shard (spawned), or once in-process."""
    n_parts = min(inference_parts(args), max(1, len(ids)))
    if n_parts > 1:
        # A training step earlier in this process leaves its memory in the caching allocator,
        # on the GPU that shard 0 then uses.
        if torch.cuda.is_initialized():
            gc.collect()
            torch.cuda.empty_cache()
        # Non-daemonic, so that a shard's DataLoader may start its worker processes.
        torch.multiprocessing.spawn(_spawned_work, nprocs=n_parts, args=(work, n_parts, args, ids), join=True,
                                    daemon=False)
    else:
        work(0, 1, args, ids)


def _spawned_work(part: int, work: Any, n_parts: int, args: Any, ids: list) -> None:
    """A spawned shard starts a fresh interpreter: torch's deterministic-algorithm and cuDNN
    switches are per process, so ``--determ`` is applied again before the shard's work."""
    if args.determ:
        set_deterministic(True)
    work(part, n_parts, args, ids)


# ----------------------------------------------------------------------------- reproducibility

# Environment variables that change which CPU/GPU kernels run, hence the last bits of every
# float result (measured: oneDNN's ISA, ATen's capability and the thread count each change the
# CAM weights within a few steps). Recorded so two runs' summaries can be compared.
KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG",
              "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES")


def configure_runtime(determ: bool, torch_threads: int | None) -> dict[str, Any]:
    """Apply ``--torch_threads`` and ``--determ``; return what decides the run's float results.

    The thread count is part of the result: torch splits convolutions and reductions into
    per-thread partial sums, so 1 and 2 threads give different last bits (and, after training
    amplifies them, different weights). Without ``--torch_threads`` torch's default (the
    machine's core count) is kept and recorded, so a rerun elsewhere can pin the same count.
    """
    if torch_threads:
        torch.set_num_threads(torch_threads)
    set_deterministic(determ)
    return runtime_facts(determ)


def runtime_facts(determ: bool) -> dict[str, Any]:
    """Library versions, CPU kernel choice, threads and switches: what two machines must share
    for their first-stage numbers to agree bit for bit (JSON-ready)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    facts: dict[str, Any] = {
        "determ": bool(determ),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": version("pillow"),
        "opencv": version("opencv-python-headless") or version("opencv-python"),
        **cpu_info(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        facts["cuda"] = torch.version.cuda
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


def save_torch(obj: Any, path: Any) -> Any:
    """``torch.save`` to ``path`` atomically, with bytes that depend on ``obj`` only.

    Through a file object torch names the zip's records ``archive/...``; given the temp file's
    name it would embed that random name, so two bit-identical runs wrote files that differed.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, write)


def first_item(batch: list) -> Any:
    """collate_fn for batch size 1 with variable-size multi-scale items."""
    return batch[0]


def read_ids(args: Any, list_attr: str) -> list[str]:
    """Ids of the list ``getattr(args, list_attr)`` ("train_list", "val_list", "infer_list"; the
    data set's default list when unset), cut to ``args.max_images`` when set (smoke runs)."""
    role = list_attr[: -len("_list")] if list_attr.endswith("_list") else list_attr
    return data_source(args).ids(role)


def eval_ids(args: Any) -> list[str]:
    """Ids of the evaluation split ``chainer_eval_set`` (VOC ``ImageSets/Segmentation/<set>.txt``,
    COCO ``lists/<set>2014.txt``).

    With ``--max_images`` only those ids that are also in the (cut) train list are kept, so a
    smoke run evaluates exactly the images it produced outputs for.
    """
    return data_source(args).ids("eval")


def pending(ids: list[str], outputs: Sequence[tuple[Path, str]], overwrite: bool) -> list[str]:
    """The ids a resumable step still has to write: every one with ``overwrite``, else those
    missing any of their files ``folder / (id + suffix)`` of ``outputs``. Makes the folders."""
    for folder, _ in outputs:
        folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        return list(ids)
    return [i for i in ids if not all((folder / f"{i}{suffix}").is_file() for folder, suffix in outputs)]


__all__ = ["get_logger", "progress", "resolve_device", "round_robin", "read_ids",
           "eval_ids", "LOGGER_NAME", "inference_parts",
           "worker_share", "run_on_devices", "training_gpus", "wrap_for_training", "training_setup", "training_loader", "pending", "shard_workers",
           "set_deterministic", "configure_runtime", "runtime_facts", "save_torch", "KERNEL_ENV"]

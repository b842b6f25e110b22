"""Process-wide run settings: host allocator, autocast, net layout (speed only); determinism and seeding."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import sys
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

# glibc's mallopt parameter ids (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above 32 MiB on 64-bit hosts; at it, every temporary of a
# 512 x 512 batch (images 12 MB, label maps 8 MB, logits in pieces) comes from the heap.
_MMAP_THRESHOLD_MAX = 32 << 20
_NEVER_TRIM = (1 << 31) - 1  # mallopt takes a C int


def keep_host_memory(enabled: bool) -> bool:
    """``train.keep_host_memory``: on glibc, serve allocations up to 32 MiB from the heap and
    never hand freed heap memory back to the system. By default glibc maps each large
    tensor afresh and unmaps it when freed, so every iteration page-faults its temporaries
    in again (tens of ms per BECO step on the CPU at 512 x 512). The price: the process
    keeps its peak heap. Returns whether the setting took effect (False off glibc)."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def make_autocast(cfg: Any, device: torch.device) -> Callable:
    """``with make_autocast(cfg, device)():`` mixed precision when ``train.amp`` is on: in
    ``train.amp_dtype`` on GPUs (float16 is the reference's; bfloat16 needs no gradient
    scaler), always bfloat16 on the CPU, whose float16 kernels are emulated and many times
    slower."""
    dtype = getattr(torch, cfg.train.amp_dtype) if device.type == "cuda" else torch.bfloat16
    return partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=cfg.train.amp)


def uses_grad_scaler(cfg: Any, device: torch.device) -> bool:
    """float16 gradients need loss scaling; bfloat16's range does not (and on the CPU torch
    has no scaler for it)."""
    return cfg.train.amp and cfg.train.amp_dtype == "float16" and device.type == "cuda"


def net_layout(net: nn.Module, cfg: Any) -> nn.Module:
    """``train.channels_last``: the net's weights in NHWC, where tensor cores convolve fastest."""
    return net.to(memory_format=torch.channels_last) if cfg.train.channels_last else net


def net_input(images: torch.Tensor, cfg: Any) -> torch.Tensor:
    """The batch in the layout the nets were put in (``net_layout``)."""
    return images.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else images


def set_deterministic(enabled: bool) -> None:
    """``--determ`` in both stages: deterministic algorithms wherever PyTorch has them.

    On the CPU a run is already bit-reproducible for a fixed machine, thread count and loader
    worker count (measured, docs/reproducibility.md); these switches matter on GPUs, where
    cuDNN's autotuner may pick another convolution algorithm per run and some kernels
    (index_add_, interpolation backward, cuBLAS split-K) accumulate in a run-dependent order.
    warn_only: an op without a deterministic implementation warns instead of stopping the run.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any CUDA work
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if hasattr(torch.backends, "mkldnn") and hasattr(torch.backends.mkldnn, "deterministic"):
        torch.backends.mkldnn.deterministic = True  # oneDNN ops that offer a deterministic mode


# CPU flags that select other oneDNN / ATen / OpenCV kernels (the widest vector unit, AMX).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the vector-unit flags present (Linux /proc/cpuinfo; None elsewhere):
    oneDNN picks its convolution kernels by them, and with them the last bits of every result."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if model is None and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif flags is None and line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = [f for f in ISA_FLAGS if f in present]
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": flags}


def set_seed(seed: int) -> None:
    """Python's, NumPy's and torch's (all devices) global generators from one seed, in both
    stages (QUIRK-3 fixed in the first). NumPy takes the seed modulo 2^32, its range (the second
    stage's seeds are checked to lie in it)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker_from_torch(worker_id: int) -> None:
    """The first stage's DataLoader ``worker_init_fn``: Python's and NumPy's seeds from the seed
    torch gives the worker (``base_seed + worker_id``, the base drawn from the loader's generator),
    so a seeded generator (``seeded_loader_kwargs``) makes the workers repeat. The second stage
    seeds its workers by rank and id instead (datasets/segmentation.seed_worker_fn, spec §2)."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def seeded_loader_kwargs(seed: int, num_workers: int) -> dict[str, Any]:
    """The first stage's DataLoader keyword arguments that decide its order and augmentation:
    a shuffling generator seeded with ``seed`` and ``seed_worker_from_torch``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    kw: dict[str, Any] = {"num_workers": num_workers, "generator": generator,
                          "worker_init_fn": seed_worker_from_torch}
    if num_workers > 0:
        kw["persistent_workers"] = False
    return kw


def configure_backends(cfg: Any) -> None:
    """Every process-wide backend setting of a run, training and testing alike: the host
    allocator, determinism or cuDNN autotuning, TF32. Call it before any CUDA work:
    ``--determ``'s cuBLAS workspace setting is read when cuBLAS starts."""
    keep_host_memory(cfg.train.keep_host_memory)
    if cfg.train.deterministic:
        set_deterministic(True)
    else:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32

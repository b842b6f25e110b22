"""Process-group set-up for torchrun (single or multi-node) and the reference's -dist spawn."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(gpu_id: int | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, or run as one process.

    NCCL on GPUs, Gloo on the CPU. Each process drives the GPU of its local rank.
    """
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
        return DistInfo(rank, world, local_rank, device)
    if gpu_id is not None and not 0 <= gpu_id < torch.cuda.device_count():
        from utils.errors import ConfigError
        seen = torch.cuda.device_count()
        raise ConfigError(f"--gpu_id {gpu_id}: this machine has {'no GPU' if seen == 0 else f'{seen} GPU(s) (0..{seen - 1})'}"
                          f"{' visible' if os.environ.get('CUDA_VISIBLE_DEVICES') is not None else ''}; "
                          f"leave --gpu_id out to run on {'the CPU' if seen == 0 else 'GPU 0'}")
    if torch.cuda.is_available():
        device = torch.device("cuda", gpu_id or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(0, 1, 0, device)


def spawn_env(rank: int, world_size: int, port: int) -> None:
    """Environment that makes a spawned worker look like a torchrun one (for -dist)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

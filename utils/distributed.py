"""Process-group set-up for every launcher: torchrun (single or multi-node),
``python -m torch.distributed.launch`` (its ``--local-rank`` flag), SLURM's ``srun`` (one
task per GPU, ranks from SLURM's variables) and the reference's ``-dist`` spawn."""
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


def apply_local_rank_flag(local_rank: int | None) -> None:
    """``torch.distributed.launch`` without ``--use-env`` passes ``--local-rank=N`` (older
    torch: ``--local_rank=N``); it also sets LOCAL_RANK, which wins where both exist."""
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03`` (what
    ``scontrol show hostnames`` would print first; used when scontrol is not at hand)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def slurm_env(env: dict | None = None) -> bool:
    """Under ``srun`` (one task per GPU), the torchrun variables from SLURM's: RANK =
    SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the
    first node of SLURM_NODELIST (unless set), MASTER_PORT 29500 + the job id's last 3 digits
    (unless set). Nothing changes when torchrun's variables are already there (torchrun
    inside an allocation) or outside SLURM. Returns whether it set them."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))))
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")[-3:] or 0)))
    return True


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

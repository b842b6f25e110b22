"""Process-group set-up for every launcher: torchrun (single or multi-node),
``python -m torch.distributed.launch`` (its ``--local-rank`` flag), SLURM's ``srun`` (one
task per GPU, ranks from SLURM's variables) and the reference's ``-dist`` spawn."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

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


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of a SLURM tasks-per-node list: ``"4(x2),2"`` is 4, 4, 2 for nodes 0, 1, 2."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node_id] if node_id < len(counts) else counts[-1]


def slurm_env(env: dict | None = None) -> bool:
    """Inside an ``srun`` step that started this process as one of several tasks (one task per
    GPU), the torchrun variables from the step's: RANK = SLURM_PROCID, WORLD_SIZE =
    SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID, LOCAL_WORLD_SIZE = this node's share of
    SLURM_STEP_TASKS_PER_NODE, MASTER_ADDR = the step's first node (unless set), MASTER_PORT =
    29500 + the job id's last 3 digits (unless set). Returns whether it set them.

    Only a step's own variables count: a batch script (``sbatch --ntasks=4``) or an
    interactive allocation also sets SLURM_PROCID and SLURM_NTASKS, and a process started there
    is one process, not rank 0 of 4 (mapping them made ``python main.py`` wait for ranks
    that never come). Nothing changes when torchrun's variables are already set (torchrun
    inside an allocation) or outside SLURM."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE")
    env["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0")))
                                  if per_node else int(env["WORLD_SIZE"]))
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    env.setdefault("MASTER_ADDR", first_host(nodes))
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")[-3:] or 0)))
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, torch.distributed.launch, srun via
    ``slurm_env``, ``-dist``) started for this run; 1 without one."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def cuda_ordinal(local_rank: int, local_world_size: int | None, visible: int) -> int:
    """The visible CUDA device this process drives. One process per GPU of the node normally
    (``cuda:LOCAL_RANK``); when the scheduler binds each task to its own GPU
    (``--gpus-per-task=1``, ``--gpu-bind``), every process sees exactly one, ``cuda:0``.
    Fewer visible GPUs than processes on the node would put two ranks on one GPU: refused."""
    if visible == 1:
        return 0
    if local_rank < visible and (local_world_size is None or local_world_size <= visible):
        return local_rank
    from utils.errors import ConfigError
    procs = local_world_size if local_world_size is not None else local_rank + 1
    raise ConfigError(f"{procs} processes on this node but {visible} GPU(s) visible to each "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process "
                      f"per GPU (torchrun --nproc_per_node={visible}, or srun with --ntasks-per-node={visible}), "
                      f"or give each task its own GPU (--gpus-per-task=1)")


def init_distributed(gpu_id: int | None = None, timeout_min: float | None = None) -> DistInfo:
    """Join the process group described by the launcher's environment, or run as one process.

    NCCL on GPUs, Gloo on the CPU. ``timeout_min`` (``dist.timeout_min``): how long a
    collective may wait for the slowest rank before the run is stopped (NCCL's own default
    is 10 minutes, shorter than some rank-0 work on COCO)."""
    if launched_world_size() > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            local_world = os.environ.get("LOCAL_WORLD_SIZE")
            device = torch.device("cuda", cuda_ordinal(local_rank, int(local_world) if local_world else None,
                                                       torch.cuda.device_count()))
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            timeout = None if timeout_min is None else datetime.timedelta(minutes=timeout_min)
            dist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (itself when not distributed): for what
    each rank would otherwise decide on its own (a clock, a random name)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(modules: list[torch.nn.Module], src: int = 0) -> None:
    """Every buffer (BatchNorm statistics) of ``modules`` set to rank ``src``'s, in one
    collective per dtype. DDP does this at the first forward after training, so validating
    through the DDP wrapper made that forward a collective: a rank with no validation image
    never called it and the others waited forever. Called by every rank, unconditionally."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    buffers = [b for m in modules for b in m.buffers()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        dist.broadcast(flat, src=src)
        with torch.no_grad():
            for b, value in zip(group, flat.split([b.numel() for b in group])):
                b.copy_(value.view_as(b))


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

"""Process-group set-up for every launcher: torchrun (single or multi-node),
``python -m torch.distributed.launch`` (its ``--local-rank`` flag), SLURM's ``srun`` (one
task per GPU, ranks from SLURM's variables) and the reference's ``-dist`` spawn."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from utils.errors import ConfigError


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


# ----------------------------------------------------------------------------- one error line for the group
#
# When one rank stops on its own error, the others are left in a collective that fails with
# the backend's "connection closed" traceback, and the launcher stops them all. Without
# coordination the user's one useful line (the failing rank's) was buried under those
# tracebacks. The ranks agree through the process group's store, which outlives the group:
# the failing rank marks itself and closes its connections; every other rank, when its
# collective breaks, finds the mark, says in one line that it stopped for that rank and
# answers; the failing rank prints its line once all have answered (or after a bounded wait),
# so it comes last, then exits first, which is the exit the launcher reports.

_FAILED = "beco/failed/"  # + rank: that rank stopped on its own error
_HEARD = "beco/heard/"    # + rank: that rank saw another rank's failure and printed its line
_DONE = "beco/done/"      # + rank: that failed rank printed its error
_BYE = "beco/bye/"        # + rank: that rank is done with the store (it only exits from here on)
# Long enough for the other ranks to reach their next collective on the CPU (Gloo). A rank
# blocked in an NCCL collective only learns of the failure at the collective timeout: there the
# failing rank waits 5 s at most, prints, and the launcher stops the rest (not tested on GPUs).
HANDSHAKE_S = 30.0


@dataclass
class _Group:
    store: Any
    rank: int
    world_size: int


def _live_group() -> _Group | None:
    """The group's store, rank and size while a multi-process group is up; the caller keeps
    it, since a rank still needs the store after its process group is gone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a group without a store: no handshake
        return None
    return _Group(store, dist.get_rank(), dist.get_world_size())


def _has(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:  # noqa: BLE001 - the store's host (rank 0 outside torchrun) is gone
        raise ConnectionError(key) from None


def _wait_for(ready: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ready():
                return True
        except ConnectionError:
            return False
        time.sleep(0.05)
    return False


def release(error: BaseException) -> None:
    """Free what the failed call held: the frames of ``error``'s traceback keep the nets alive,
    and a DistributedDataParallel module's reducer keeps the process group, whose Gloo
    connections then stay open after ``destroy_process_group`` (measured with torch 2.14), so
    the other ranks would wait in their collective for the timeout. The traceback has been
    logged by now; its frames' locals are no longer needed."""
    traceback.clear_frames(error.__traceback__)
    gc.collect()


def _close_group(group: _Group) -> None:
    """End the other ranks' collectives with this rank now, not at the collective timeout
    (after ``release``, nothing holds the group any more). The store outlives the group: the
    handshake runs over it. A rank stuck in an NCCL collective does not notice (not tested on
    GPUs): it waits for the launcher."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a broken group may fail to go: it is left behind
            dist.destroy_process_group()


def _gloo() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"


@contextlib.contextmanager
def failing_rank(line: str, seconds: float = HANDSHAKE_S) -> Iterator[None]:
    """Around the print of this rank's own error ``line``: before it, tell the other ranks and
    wait until each has stopped for it (or has failed itself, or ``seconds`` passed); after
    it, let them go. Outside a process group it only writes torchrun's error file.

    The process is ending: from here on it ignores SIGTERM, which the launcher sends once
    another rank has exited and which would otherwise cut this rank's exit short (torchrun
    then reports it as killed)."""
    failed_at = time.time()
    write_launcher_error(line, failed_at)
    group = _live_group()
    if group is None:
        yield
        return
    with contextlib.suppress(ValueError):  # not the main thread: no signal handlers to set
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    others = [r for r in range(group.world_size) if r != group.rank]
    try:
        group.store.set(f"{_FAILED}{group.rank}", repr(failed_at))
    except Exception:  # noqa: BLE001 - without the store the line is printed at once
        others = []
    if not _gloo():  # NCCL: the others mostly sit in a collective that cannot tell them
        seconds = min(seconds, 5.0)
    _close_group(group)
    _wait_for(lambda: all(_has(group.store, f"{_FAILED}{r}") or _has(group.store, f"{_HEARD}{r}")
                          for r in others), seconds if others else 0)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            group.store.set(f"{_DONE}{group.rank}", "1")
        _leave(group)


def failed_rank() -> int | None:
    """The other rank that stopped the group with its own error, if one did: asked by a rank
    whose collective broke."""
    group = _live_group()
    if group is None:
        return None
    for r in range(group.world_size):
        try:
            if r != group.rank and _has(group.store, f"{_FAILED}{r}"):
                return r
        except ConnectionError:
            return None
    return None


def stopped_for(failed: int, line: str, seconds: float = HANDSHAKE_S) -> None:
    """After this rank printed ``line`` (that it stopped for rank ``failed``): answer that rank,
    and wait until it has printed its error."""
    group = _live_group()
    if group is None:
        return
    try:
        failed_at = float(group.store.get(f"{_FAILED}{failed}").decode())
    except Exception:  # noqa: BLE001
        failed_at = time.time()
    # Later than the failed rank's by at least a second (torchrun compares whole seconds), so
    # torchrun's summary names that rank as the first failure, with its line.
    write_launcher_error(line, max(time.time(), failed_at + 1))
    with contextlib.suppress(Exception):
        group.store.set(f"{_HEARD}{group.rank}", "1")
    _close_group(group)  # with 3 ranks or more, another may wait on this one rather than the failed one
    _wait_for(lambda: _has(group.store, f"{_DONE}{failed}"), seconds)
    _leave(group)


def _leave(group: _Group, seconds: float = 10.0) -> None:
    """This rank's last use of the store. Rank 0 hosts the store outside torchrun, and a rank
    still asking it after it is gone gets c10d's warning with a C++ stack printed after the
    error line; so rank 0 waits until every rank has left before it exits."""
    with contextlib.suppress(Exception):
        group.store.set(f"{_BYE}{group.rank}", "1")
    if group.rank == 0:
        _wait_for(lambda: all(_has(group.store, f"{_BYE}{r}") for r in range(group.world_size)), seconds)


def write_launcher_error(message: str, when: float) -> None:
    """Under torchrun (TORCHELASTIC_ERROR_FILE set), ``message`` as this rank's error file:
    torchrun's failure summary shows it, and takes the failure with the earliest ``when`` for
    the root cause, rather than a pointer to its documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                            "timestamp": str(int(when))}}}
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump(record, f)

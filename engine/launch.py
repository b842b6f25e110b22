"""How main.py's processes start and end. ``-dist`` spawns one process per visible GPU, each
running main.py's command (torchrun and srun start the processes themselves); every process
ends in ``exit_code_of``: one console line and an exit code for what stopped it.

These sit in engine/ rather than utils/distributed.py because they run the engine's command
line (``entry``, main.main) and know its errors; utils/distributed.py only knows the group.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

import torch
import torch.multiprocessing as mp

from utils.distributed import (HANDSHAKE_S, cleanup, failed_rank, failing_rank, free_port, launched_by_torchrun,
                               launched_world_size, release, spawn_env, stopped_for)
from utils.errors import BecoError, one_line
from utils.logs import log_error_to_file


def dist_refusal() -> str | None:
    """Why ``-dist`` cannot spawn here (a launcher started the processes already, or there is
    no GPU), or None."""
    if launched_by_torchrun():
        n = launched_world_size()
        return (f"-dist spawns one process per GPU, but a launcher already started {n} "
                f"process{'es' if n != 1 else ''} (torchrun, torch.distributed.launch or an srun step): "
                f"leave -dist out")
    if torch.cuda.device_count() == 0:
        return ("-dist spawns one process per GPU and there is none; on the CPU use "
                "torchrun --nproc_per_node=N main.py ...")
    return None


def _spawned(rank: int, world_size: int, port: int, entry: Callable[..., int], argv: list[str]) -> None:
    spawn_env(rank, world_size, port)
    code = entry(argv, spawned=True)
    if code:
        sys.exit(code)  # the parent returns it (a return value would be lost)


def spawn_per_gpu(entry: Callable[..., int], argv: list[str]) -> int:
    """``-dist``: one process per visible GPU, each running ``entry(argv, spawned=True)``. A
    SIGTERM to the parent alone is passed on to the ranks (they save a checkpoint and stop);
    the parent exits with the first failing rank's code (143 after SIGTERM), as srun does."""
    n = torch.cuda.device_count()
    context = mp.start_processes(_spawned, args=(n, free_port(), entry, argv), nprocs=n, join=False,
                                 start_method="spawn")

    def forward(signum, frame) -> None:
        for proc in context.processes:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        # The grace: once a rank fails, the others stop on their own (utils/distributed.py's
        # handshake) and the failing rank's line stays the last one printed.
        while not context.join(grace_period=HANDSHAKE_S + 5):
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code > 0 else 128 - e.exit_code  # killed by a signal: 128 + its number
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def exit_code_of(work: Callable[[], object]) -> int:
    """Run ``work`` (training or testing) in this process; 0, or the exit code of what stopped it."""
    try:
        work()
    except BecoError as e:
        # Bad input, a refused resume, a diverged or preempted run: one line on the console (also
        # for errors raised in a loader worker), the traceback in the run's log. Anything else is
        # a bug and keeps its traceback. In a process group the line comes after the other
        # ranks have stopped, so it is the last one a rank prints.
        message = one_line(e)
        log_error_to_file(f"error: {message}", sys.exc_info())
        release(e)
        with failing_rank(f"error: {message}"):
            print(f"error: {message}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception as e:
        # A collective broken because another rank stopped on its error: that rank prints why.
        failed = failed_rank()
        if failed is None:
            # A bug (its traceback is kept): in a process group it is printed last too.
            first = next(iter(str(e).splitlines()), "")
            release(e)  # the traceback stays printable: only its frames' locals go
            with failing_rank(f"{type(e).__name__}: {first}"):
                pass
            raise
        rank = int(os.environ.get("RANK", "0"))
        line = f"error: rank {rank} stopped: rank {failed} failed (its error follows)"
        log_error_to_file(line, sys.exc_info())
        print(line, file=sys.stderr, flush=True)
        release(e)
        stopped_for(failed, line)
        return 1
    finally:
        cleanup()
    return 0

"""Run a function in N processes of one gloo process group on the CPU, as torchrun would
start them, and get each rank's return value back (tests of what ranks must agree on).

A rank that raises gives its traceback; ranks that are still running after ``timeout``
seconds are killed and reported as hung, which is how a missing collective shows."""
from __future__ import annotations

import os
import queue
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from utils.distributed import free_port


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
               results: "mp.Queue") -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    import torch
    torch.set_num_threads(1)
    try:
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "raised", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180,
              kill_on_bad_exit: bool = False) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with torchrun's
    variables set (``fn`` joins the group itself, e.g. through ``init_distributed``); returns
    the values in rank order. ``fn`` and its arguments must be picklable (module level).

    ``kill_on_bad_exit``: as ``srun --kill-on-bad-exit``, once a rank returns an exit code
    other than 0 (``fn``'s value, or its first item), the ranks still running are killed;
    their value is then ``"killed"``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    try:
        while len(got) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(got))
                raise AssertionError(f"rank(s) {missing} still running after {timeout} s (a collective that "
                                     f"not every rank joins?); finished: "
                                     f"{ {r: s for r, (s, _) in got.items()} }") from None
            got[rank] = (status, value)
            code = value[0] if isinstance(value, tuple) else value
            if kill_on_bad_exit and status == "ok" and code != 0:
                for other, p in enumerate(procs):
                    if other not in got:
                        p.kill()
                        p.join()
                        got[other] = ("ok", "killed")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    raised = {r: v for r, (s, v) in got.items() if s == "raised"}
    if raised:
        raise AssertionError("\n".join(f"rank {r} raised:\n{tb}" for r, tb in sorted(raised.items())))
    return [got[r][1] for r in range(world_size)]

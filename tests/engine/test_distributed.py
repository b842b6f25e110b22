"""What the ranks of a multi-process run must agree on, tested with 2 gloo ranks on the CPU
(tests/distributed_harness.py): the iteration's stop/NaN decision, the run folder, BatchNorm
statistics before validation, and rank-0 work split across ranks (the preflight's reads, the
results card's pseudo-label quality) so that no rank waits past the collective timeout."""
from __future__ import annotations

import io
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, tiny_config, write_tiny_voc
from tests.distributed_harness import run_ranks

TRAIN_IDS = [f"2007_00000{i}" for i in range(1, 7)]
VAL_IDS = ["2008_000001", "2008_000002", "2008_000003"]


# ----------------------------------------------------------------------------- in each rank

def _agreements(rank: int, world: int, root: str, run_dir: str) -> dict:
    """Everything the ranks must decide alike, each from its own inputs."""
    from datasets.segmentation import EvalSet, TrainSet
    from datasets.verify import preflight
    from engine.build import run_dir_for
    from engine.results_card import pseudo_label_quality
    from engine.trainer import Stop, agree_on_step
    from utils.distributed import broadcast_buffers, init_distributed
    from utils.errors import DataError
    info = init_distributed(timeout_min=2)
    out: dict = {}

    # One iteration: rank 1's loss is NaN, rank 0's is not; rank 0 alone was sent SIGTERM.
    stop = Stop()
    out["nan"] = agree_on_step(torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([float("nan"), 2.0]),
                               stop, info)
    stop.requested = rank == 0
    out["stop"] = agree_on_step(torch.tensor([1.0, 2.0]), stop, info)[1]

    # BatchNorm statistics: rank 0's on every rank before validation.
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank))
    bn.num_batches_tracked.fill_(10 + rank)
    broadcast_buffers([bn])
    out["buffers"] = (bn.running_mean.tolist(), int(bn.num_batches_tracked))

    # A time-stamped run folder read from each rank's own clock.
    cfg = tiny_config(Path(root), "logging.tag=''", f"logging.path_base={run_dir}")
    real = time.strftime
    time.strftime = lambda fmt, *a: f"clock-of-rank-{rank}"
    try:
        out["run_dir"] = str(run_dir_for(cfg, None))
    finally:
        time.strftime = real

    # The preflight: each rank reads its share; rank 0 decides for all.
    sets = [(TrainSet(cfg.data), "train"), (EvalSet(cfg.data, "val"), "val")]
    from datasets import verify as verify_mod
    reads: list[str] = []
    real_read = verify_mod._read
    verify_mod._read = lambda f, item_id, s: (reads.append(item_id), real_read(f, item_id, s))[1]
    preflight(sets, info)
    out["read_first"] = sorted(set(reads))
    reads.clear()
    preflight(sets, info)  # the cache rank 0 wrote holds every rank's files
    out["read_again"] = sorted(set(reads))
    verify_mod._read = real_read
    # A truncated image in each rank's share: both named, on both ranks.
    torch.distributed.barrier()
    if rank == 0:
        for item_id in (TRAIN_IDS[0], TRAIN_IDS[1]):
            path = Path(root) / "VOC2012" / "JPEGImages" / f"{item_id}.jpg"
            path.write_bytes(path.read_bytes()[:100])
    torch.distributed.barrier()
    try:
        preflight(sets, info)
        out["bad"] = None
    except DataError as e:
        out["bad"] = str(e)

    # The pseudo-label quality of the results card, from every rank's share.
    out["quality"] = pseudo_label_quality(cfg, Path(run_dir), info.rank, info.world_size)
    torch.distributed.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def agreements(tmp_path_factory) -> tuple[list[dict], dict]:
    from engine.results_card import pseudo_label_quality
    root = write_tiny_voc(tmp_path_factory.mktemp("dist") / "data", TRAIN_IDS, VAL_IDS)
    run_dir = tmp_path_factory.mktemp("run")
    single = pseudo_label_quality(tiny_config(root), run_dir)  # before the images are truncated
    return run_ranks(_agreements, 2, str(root), str(run_dir), timeout=240), single


def test_a_nan_on_one_rank_is_seen_by_every_rank(agreements):
    ranks, _ = agreements
    for rank, out in enumerate(ranks):
        mine, stopping, non_finite = out["nan"]
        assert list(non_finite) == [1] and np.isnan(non_finite[1][0]) and non_finite[1][1] == 2.0
        assert not stopping
        assert (mine == [1.0, 2.0]) if rank == 0 else (np.isnan(mine[0]) and mine[1] == 2.0)


def test_a_sigterm_on_one_rank_stops_every_rank(agreements):
    assert [out["stop"] for out in agreements[0]] == [True, True]


def test_validation_sees_rank_0s_batchnorm_statistics(agreements):
    assert [out["buffers"] for out in agreements[0]] == [([0.0, 0.0, 0.0], 10)] * 2


def test_the_time_stamped_run_folder_is_rank_0s(agreements):
    assert [Path(out["run_dir"]).name for out in agreements[0]] == ["clock-of-rank-0"] * 2


def test_the_preflight_reads_each_sample_on_one_rank_and_caches_them_all(agreements):
    ranks, _ = agreements
    first = [set(out["read_first"]) for out in ranks]
    assert first[0] | first[1] == set(TRAIN_IDS + VAL_IDS) and not first[0] & first[1]
    assert first[0] == set(TRAIN_IDS[0::2] + VAL_IDS[0::2])
    assert [out["read_again"] for out in ranks] == [[], []]


def test_bad_files_in_every_ranks_share_stop_every_rank_with_one_message(agreements):
    ranks, _ = agreements
    message = ranks[0]["bad"]
    assert message is not None and message == ranks[1]["bad"]
    assert message.startswith("2 of 6 training samples are bad")
    assert f"'{TRAIN_IDS[0]}'" in message and f"'{TRAIN_IDS[1]}'" in message


def test_pseudo_label_quality_from_shards_equals_one_process(agreements):
    ranks, single = agreements
    assert single["miou"] is not None
    assert ranks[0]["quality"] == single and ranks[1]["quality"] == single


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def syn16(tmp_path_factory) -> Path:
    from datasets.synthetic.voc import make_synthetic_voc
    root = tmp_path_factory.mktemp("syn16") / "data"
    make_synthetic_voc(root, train=16, val=2, test=0, size=(48, 48), classes=3, seed=0)
    return root


def _main_args(root: Path, logs: Path, tag: str) -> list[str]:
    """2 ranks x 2 images: 4 iterations an epoch."""
    return ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(logs), "--logging_tag", tag,
            f"data.root={root}", "data.synthetic=null", "data.num_classes=4", "data.crop_size=48",
            "data.val_size=48", "data.batch_size=2", "data.num_workers=0", "train.epochs=1", "train.num_vis=0",
            "train.ckpt_interval=null"]


def _train_with_a_nan_on_rank_1(rank: int, world: int, args: list[str]) -> tuple[int, str]:
    """main.py in a 2-rank group; rank 1's second iteration gives a NaN loss, and rank 1's
    clock is a day behind rank 0's."""
    import engine.beco
    import main
    if rank == 1:
        time.strftime = lambda fmt, *a: "19990101-000000"
        real, calls = engine.beco.training_step, [0]

        def poisoned(*a, **k):
            out = real(*a, **k)
            calls[0] += 1
            if calls[0] == 2:
                out["total"] = out["total"] * float("nan")
            return out
        engine.beco.training_step = poisoned
    err = io.StringIO()
    with redirect_stderr(err):
        code = main.main(args)
    return code, err.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rank_stops_with_the_same_error_when_one_ranks_loss_is_not_finite(syn16, tmp_path):
    logs = tmp_path / "logs"
    results = run_ranks(_train_with_a_nan_on_rank_1, 2, _main_args(syn16, logs, ""), timeout=240)
    assert [code for code, _ in results] == [1, 1], results
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in results]
    assert errors[0] == errors[1] and len(errors[0]) == 1, results
    assert errors[0][0].startswith("error: non-finite loss at epoch 1, iteration 1 on rank(s) [1] (ce1=")
    assert "total=nan); the last good checkpoint is left as it was" in errors[0][0]
    # One run folder, named from rank 0's clock (not rank 1's 1999).
    (run,) = list(logs.iterdir())
    assert run.name != "19990101-000000" and (run / "train.log").is_file()


def _preempted_in_the_second_iteration(rank: int, world: int, args: list[str]) -> int:
    """SLURM's --signal=TERM reaches every task during iteration 2; rank 0's disk is slow."""
    import signal

    import engine.beco
    import engine.checkpoint
    import main
    real_step, calls = engine.beco.training_step, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_step(*a, **k)
    engine.beco.training_step = step
    if rank == 0:
        real_save = engine.checkpoint.save

        def slow_save(path, state):
            time.sleep(1.5)
            return real_save(path, state)
        engine.checkpoint.save = slow_save
    return main.main(args)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_preempted_srun_step_keeps_rank_0s_checkpoint(syn16, tmp_path):
    """srun --kill-on-bad-exit kills the step's other tasks once one exits non-zero: a rank
    that left right after SIGTERM took rank 0 down while it was still writing."""
    results = run_ranks(_preempted_in_the_second_iteration, 2, _main_args(syn16, tmp_path, "pre"), timeout=240,
                        kill_on_bad_exit=True)
    # The first rank to exit says 143; the other may be killed by then, but only after the write.
    assert sorted(map(str, results)) in (["143", "143"], ["143", "killed"]), results
    state = torch.load(tmp_path / "pre" / "latest_ckpt.pth", weights_only=False)
    assert (state["iteration"], state["iters_per_epoch"]) == (2, 4)

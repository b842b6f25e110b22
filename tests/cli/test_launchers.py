"""Every way users launch training and testing: the reference README's commands verbatim
(adapted only by --config), python -m torch.distributed.launch, torchrun with two node ranks
on one machine, and SLURM's rank variables."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from utils.distributed import apply_local_rank_flag, cuda_ordinal, first_host, free_port, slurm_env
from utils.errors import ConfigError

# As in an activated environment: `python` and `torchrun` are the test interpreter's.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _tiny_config(tmp: Path, train: int = 8) -> Path:
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""_base_: {REPO / 'configs/demo.yaml'}
data:
  root: data/tiny
  synthetic: {{train: {train}, val: 3, test: 1, size: [48, 48], classes: 3, seed: 0, colours: class,
              colour_jitter: 25.0, object_scale: [0.22, 0.4], max_objects: 3}}
  num_classes: 4
  crop_size: 48
  val_size: 48
  batch_size: 2
  num_workers: 0
train:
  epochs: 1
  num_vis: 0
method:
  warmup_epochs: 1
""")
    return cfg


def _sh(cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_reference_readme_commands_work_as_written(tmp_path):
    """The four commands of the BECO README, run from a fresh folder with a tiny --config."""
    cfg = _tiny_config(tmp_path)
    main, test = REPO / "main.py", REPO / "test.py"
    # Training, to have a run; from a batch script (sbatch --ntasks=4), whose SLURM variables
    # describe the job, not this process: it is one process, not rank 0 of 4 waiting for the rest.
    batch_script = "SLURM_JOB_ID=4242 SLURM_PROCID=0 SLURM_NTASKS=4 SLURM_LOCALID=0 SLURM_NODELIST=localhost"
    r = _sh(f"{batch_script} python {main} --config {cfg} --logging_tag beco1", tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 1 process(es) on cpu |" in (tmp_path / "data/logging/beco1/train.log").read_text()
    if not torch.cuda.device_count():  # the -dist forms need GPUs: a clear error, exit 2
        for cmd in (f"CUDA_VISIBLE_DEVICES=0,1,2,3 python {main} -dist --logging_tag beco1 --config {cfg}",
                    f"CUDA_VISIBLE_DEVICES=0,1 python {main} -dist --logging_tag beco1 --amp --config {cfg}"):
            r = _sh(cmd, tmp_path)
            assert r.returncode == 2 and "-dist spawns one process per GPU and there is none" in r.stderr
    r = _sh(f"CUDA_VISIBLE_DEVICES=0 python {main} --test --logging_tag beco1 --ckpt best_ckpt.pth --config {cfg}",
            tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--ckpt best_ckpt.pth: using data/logging/beco1/best_ckpt.pth" in r.stderr
    r = _sh(f'python {test} --crf --logits_dir ./data/logging/beco1/logits --mode "val"', tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "data/logging/beco1/val_pred_crf_scores.json").is_file()


def _two_nodes(cwd: Path, cfg: Path, tag: str, *extra: str) -> list[subprocess.Popen]:
    """2 ranks over two "nodes" on this machine: node 0 is ``python -m torch.distributed.launch``
    (the launcher many WSSS repositories document; it passes --local-rank=N), node 1 is
    ``torchrun``. Each node in its own session (process group), as on two machines; 2 loader
    workers per rank; 1 validation image, so rank 1's validation shard is empty.

    Two ranks, not more, keep the resume bit-exact: with 3 or more, gloo's all-reduce adds the
    ranks' gradients in an order that depends on DDP's bucket layout, which DDP rebuilds after
    its first iteration, so a resumed run differs from an uninterrupted one in the last bits."""
    port = free_port()
    common = (f"--nnodes 2 --master_addr 127.0.0.1 --master_port {port} {REPO / 'main.py'} --config {cfg} "
              f"--logging_tag {tag} --determ data.num_workers=2 train.val_subset=1 train.ckpt_interval=1 "
              + " ".join(extra))
    cmds = [f"python -m torch.distributed.launch --nproc_per_node 1 --node_rank 0 {common}",
            f"torchrun --nproc_per_node 1 --node_rank 1 {common}"]
    return [subprocess.Popen(cmd, shell=True, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True) for cmd in cmds]


def _logged_iterations(run: Path) -> list[dict]:
    log = run / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")] if log.is_file() else []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_an_empty_validation_shard_and_a_group_sigterm_with_loader_workers(tmp_path):
    cfg = _tiny_config(tmp_path, train=16)  # 8 a rank: 4 iterations
    _sh(f"python -c \"from engine.config import load_config; "
        f"from datasets.synthetic.voc import make_synthetic_voc_from_config as m; "
        f"m('data/tiny', load_config('{cfg}').data.synthetic)\"", tmp_path)
    # Rank 1 validates nothing and must not leave rank 0 waiting.
    procs = _two_nodes(tmp_path, cfg, "nodes")
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    run = tmp_path / "data/logging/nodes"
    log = (run / "train.log").read_text()
    assert "2 process(es)" in log and "parameters of all 2 ranks agree" in log and "epoch 1: val mIoU" in log
    latest = torch.load(run / "latest_ckpt.pth", weights_only=False)
    assert len(latest["rng"]) == 2  # every rank's RNG streams, for an exact resume
    assert not any(k.startswith("module.") for k in latest["net_state_dict"]["network1"])  # unwrapped names
    assert (run / "best_ckpt.pth").is_file()
    assert [x["iter"] for x in _logged_iterations(run)] == list(range(4))  # logged once, by rank 0

    # The same run, stopped by SIGTERM to both process groups (the launchers, the ranks and
    # their loader workers) during the epoch, then resumed: every rank saves and stops at
    # one iteration, and the resumed run ends with the uninterrupted run's losses and weights.
    cut = tmp_path / "data/logging/cut"
    procs = _two_nodes(tmp_path, cfg, "cut")
    deadline = time.time() + 300
    while time.time() < deadline and not _logged_iterations(cut) and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    state = torch.load(cut / "latest_ckpt.pth", weights_only=False)
    assert 1 <= state["iteration"] <= 3, state["iteration"]  # mid-epoch
    # Every rank printed the same stop (torchrun itself reports the signal it got as a failure).
    stopped = f"error: stopped by SIGTERM at iteration {state['iteration']}; resume with --ckpt"
    assert [err.count(stopped) for _, err in outs] == [1, 1], [err[-1500:] for _, err in outs]
    procs = _two_nodes(tmp_path, cfg, "cut", "--ckpt", str(cut / "latest_ckpt.pth"))
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    assert [x["total"] for x in _logged_iterations(cut)] == [x["total"] for x in _logged_iterations(run)]
    resumed = torch.load(cut / "latest_ckpt.pth", weights_only=False)["net_state_dict"]
    for net, weights in latest["net_state_dict"].items():
        for k, v in weights.items():
            assert torch.equal(resumed[net][k], v), (net, k)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dist_spawns_a_rank_per_gpu_and_passes_a_sigterm_on(tmp_path):
    """The reference's -dist on a machine that claims 2 GPUs (the ranks themselves find no CUDA
    and use gloo): a SIGTERM to the parent alone reaches both ranks, which save and stop at
    one iteration; the parent exits with their 143."""
    cfg = _tiny_config(tmp_path, train=16)
    wrapper = ("import sys, torch; torch.cuda.device_count = lambda: 2; "
               "import main; sys.exit(main.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", wrapper, "--config", str(cfg), "-dist", "--logging_tag", "dist",
                             "train.ckpt_interval=null"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "data/logging/dist"
    deadline = time.time() + 240
    while time.time() < deadline and not _logged_iterations(run) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "2 process(es)" in (run / "train.log").read_text()
    state = torch.load(run / "latest_ckpt.pth", weights_only=False)
    assert 1 <= state["iteration"] <= 3 and err.count("error: stopped by SIGTERM at iteration") == 2


def test_slurm_step_variables_become_the_process_group_settings():
    """Inside an srun step of 8 tasks over two nodes (what tools/slurm_train.sh starts)."""
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
           "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_NODELIST": "gpu[01-04]", "SLURM_JOB_ID": "123456"}
    assert slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu03" and env["MASTER_PORT"] == str(29500 + 456)
    # A step of 6 tasks inside a job of 16: the step's count is the world, and an uneven
    # layout gives each node its own share.
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "2", "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "4,2",
           "SLURM_STEP_NODELIST": "a[1-2]"}
    assert slurm_env(env)
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("6", "2")
    # torchrun inside an allocation has set them already: left alone.
    torchrun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "RANK": "3",
                "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert not slurm_env(torchrun) and torchrun["RANK"] == "3"
    assert not slurm_env({})  # not under SLURM
    assert first_host("node7") == "node7" and first_host("a[10-12,15],b1") == "a10"


@pytest.mark.parametrize("where, env", [
    # sbatch --ntasks=4: the batch script itself is one process, not rank 0 of 4
    ("batch script", {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
                      "SLURM_NODELIST": "n1"}),
    # salloc / srun --pty bash: an interactive shell is a step of one task
    ("interactive step", {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
                          "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "77"}),
])
def test_slurm_variables_outside_a_multi_task_step_are_left_alone(where, env):
    before = dict(env)
    assert not slurm_env(env), where
    assert env == before


@pytest.mark.parametrize("local_rank, local_world, visible, expected", [
    (0, 4, 4, 0), (3, 4, 4, 3), (3, 4, 8, 3),   # one process per GPU of the node
    (3, 4, 1, 0), (0, 1, 1, 0),                  # --gpus-per-task=1: each task sees its own GPU as cuda:0
    (2, None, 4, 2),                             # a launcher that does not say how many share the node
])
def test_each_rank_drives_a_gpu_it_can_see(local_rank, local_world, visible, expected):
    assert cuda_ordinal(local_rank, local_world, visible) == expected


@pytest.mark.parametrize("local_rank, local_world, visible", [(1, 4, 2), (3, None, 2)])
def test_more_processes_than_visible_gpus_is_an_error_saying_what_to_do(local_rank, local_world, visible):
    with pytest.raises(ConfigError, match=r"processes on this node but 2 GPU\(s\) visible .*--nproc_per_node=2"):
        cuda_ordinal(local_rank, local_world, visible)


def test_dist_flag_under_a_launcher_that_started_several_processes_is_refused(tmp_path):
    """-dist spawns one process per GPU itself; inside torchrun or an srun step of several tasks
    it cannot be honoured (it used to be ignored silently)."""
    for launcher in ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                     {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}):
        env = {**ENV, **launcher}
        r = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs/demo.yaml"), "-dist"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2, (launcher, r.stderr[-2000:])
        assert "error: -dist spawns one process per GPU, but a launcher already started 2 processes" in r.stderr


def test_local_rank_flag_and_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    apply_local_rank_flag(3)
    assert os.environ["LOCAL_RANK"] == "3"
    apply_local_rank_flag(1)  # the environment wins where both exist
    assert os.environ["LOCAL_RANK"] == "3"
    from main import parse_args
    assert parse_args(["--local-rank=2"]).local_rank == 2 and parse_args(["--local_rank", "1"]).local_rank == 1


def test_slurm_script_launches_one_task_per_gpu(tmp_path):
    """tools/slurm_train.sh with a stand-in srun that records what it was asked to run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "srun_args"}\n')
    (fake / "srun").chmod(0o755)
    env = {**ENV, "PATH": f"{fake}{os.pathsep}{ENV['PATH']}", "GPUS": "8", "GPUS_PER_NODE": "4"}
    r = subprocess.run([str(REPO / "tools/slurm_train.sh"), "gpu", "beco8", "configs/beco_voc.yaml",
                        "data.batch_size=2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "srun_args").read_text().split("\n")
    for expected in ("-p", "gpu", "--job-name=beco8", "--gres=gpu:4", "--ntasks=8", "--ntasks-per-node=4",
                     "--signal=TERM@120", str(REPO / "main.py"), "--config", "configs/beco_voc.yaml",
                     "--logging_tag", "beco8", "data.batch_size=2"):
        assert expected in args, (expected, args)
    usage = subprocess.run([str(REPO / "tools/slurm_train.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "PARTITION JOB_NAME CONFIG" in usage.stdout


# ----------------------------------------------------------------------------- one rank's error

# main.py with one training image going bad after rank 0's preflight check (a file still being
# copied, a flaky mount): only the rank whose shard holds it reads it, and stops on a DataError
# while the other rank waits in a collective. The bad file is written to bad.txt.
_BAD_IMAGE_AFTER_PREFLIGHT = """
import sys
from pathlib import Path
import torch
if {fake_gpus}:
    torch.cuda.device_count = lambda: 2  # -dist: one rank per "GPU"; the ranks use gloo on the CPU
import engine.build
import main

real = engine.build.preflight


def preflight(sets, info):
    real(sets, info)
    if info.rank == 0 and not Path("bad.txt").exists():
        files = sets[0][0].files
        path = files.image(files.ids[0])
        path.write_bytes(path.read_bytes()[:100])
        Path("bad.txt").write_text(f"{{files.ids[0]}} {{path}}")


engine.build.preflight = preflight
if __name__ == "__main__":
    sys.exit(main.main(sys.argv[1:]))
"""
_TORCHRUN_LOG = r"^[IWE]\d{4} \d\d:\d\d:\d\d"  # torchrun's own log lines: "E1203 16:20:27.080000 ..."


def _one_bad_image_run(tmp_path: Path, launcher: str) -> tuple[subprocess.CompletedProcess, str, str]:
    tmp_path.mkdir()
    cfg = _tiny_config(tmp_path, train=16)
    wrapper = tmp_path / "bad_image_run.py"
    wrapper.write_text(_BAD_IMAGE_AFTER_PREFLIGHT.format(repo=str(REPO), fake_gpus=launcher == "-dist"))
    args = f"--config {cfg} --logging_tag bad train.ckpt_interval=null"
    cmd = (f"python {wrapper} -dist {args}" if launcher == "-dist" else
           f"torchrun --nproc_per_node 2 --master_port {free_port()} {wrapper} {args}")
    r = _sh(cmd, tmp_path, timeout=300)
    item_id, path = (tmp_path / "bad.txt").read_text().split(" ", 1)
    return r, item_id, path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_ranks_error_is_the_last_line_and_the_other_rank_prints_no_traceback(tmp_path):
    # main.py's own launch (-dist): the failing rank's line ends the output.
    r, item_id, path = _one_bad_image_run(tmp_path / "dist", "-dist")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: image for id '{item_id}' is unreadable or truncated: {path}"), lines[-5:]
    assert re.fullmatch(r"error: rank ([01]) stopped: rank (?!\1)[01] failed \(its error follows\)", lines[-2]), lines[-5:]
    assert sum(line.startswith("error: ") for line in lines) == 2

    # torchrun: the ranks' output ends the same way; torchrun then reports the failure itself,
    # with its own traceback (ChildFailedError) whose root cause is that line.
    r, item_id, path = _one_bad_image_run(tmp_path / "torchrun", "torchrun")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if re.match(_TORCHRUN_LOG, line) or line.startswith("Traceback"))
    ranks, torchrun = lines[:start], lines[start:]
    assert not any("Traceback" in line or line.startswith("[rank") for line in ranks), "\n".join(ranks[-20:])
    assert ranks[-1].startswith(f"error: image for id '{item_id}' is unreadable or truncated: {path}"), ranks[-5:]
    assert re.fullmatch(r"error: rank [01] stopped: rank [01] failed \(its error follows\)", ranks[-2]), ranks[-5:]
    summary = "\n".join(torchrun)
    assert summary.count("Traceback") == 1 and "ChildFailedError" in summary, summary
    root = summary[summary.index("Root Cause (first observed failure):"):]
    assert f"traceback : error: image for id '{item_id}' is unreadable or truncated: {path}" in root, summary
    assert "exitcode  : 1 " in root, summary

"""Every way users launch training and testing: the reference README's commands verbatim
(adapted only by --config), python -m torch.distributed.launch, torchrun with two node ranks
on one machine, and SLURM's rank variables."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from utils.distributed import apply_local_rank_flag, first_host, free_port, slurm_env

# As in an activated environment: `python` and `torchrun` are the test interpreter's.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _tiny_config(tmp: Path) -> Path:
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""_base_: {REPO / 'configs/demo.yaml'}
data:
  root: data/tiny
  synthetic: {{train: 8, val: 3, test: 1, size: [48, 48], classes: 3, seed: 0, colours: class,
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
    r = _sh(f"python {main} --config {cfg} --logging_tag beco1", tmp_path)  # training, to have a run
    assert r.returncode == 0, r.stderr[-2000:]
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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_distributed_launch_and_torchrun_with_two_node_ranks(tmp_path):
    cfg = _tiny_config(tmp_path)
    _sh(f"python -c \"import sys; sys.path.insert(0, '{REPO}'); from utils.config import load_config; "
        f"from datasets.synthetic_voc import make_synthetic_voc_from_config as m; "
        f"m('data/tiny', load_config('{cfg}').data.synthetic)\"", tmp_path)
    # The launcher many WSSS repositories document: it passes --local-rank=N.
    r = _sh(f"python -m torch.distributed.launch --nproc_per_node=2 --master_port={free_port()} "
            f"{REPO / 'main.py'} --config {cfg} --logging_tag launch", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "data/logging/launch/train.log").read_text()
    assert "2 process(es)" in log and "parameters of all 2 ranks agree" in log
    # Two node ranks x one process on one machine, as two torchrun invocations.
    port = free_port()
    cmd = (f"torchrun --nnodes 2 --nproc_per_node 1 --node_rank {{rank}} --master_addr 127.0.0.1 "
           f"--master_port {port} {REPO / 'main.py'} --config {cfg} --logging_tag nodes")
    procs = [subprocess.Popen(cmd.format(rank=k), shell=True, cwd=tmp_path,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    run = tmp_path / "data/logging/nodes"
    assert sorted(p.name for p in (tmp_path / "data/logging").iterdir()) == ["launch", "nodes"]
    log = (run / "train.log").read_text()
    assert "2 process(es)" in log and "parameters of all 2 ranks agree" in log
    latest = torch.load(run / "latest_ckpt.pth", weights_only=False)
    assert len(latest["rng"]) == 2  # every rank's RNG streams, for an exact resume
    assert not any(k.startswith("module.") for k in latest["net_state_dict"]["network1"])  # unwrapped names
    assert (run / "best_ckpt.pth").is_file()
    # 8 images / (2 ranks x 2) = 2 iterations, logged once by rank 0.
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2


def test_slurm_variables_become_the_process_group_settings():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123456"}
    assert slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu03" and env["MASTER_PORT"] == str(29500 + 456)
    # torchrun inside an allocation has set them already: left alone.
    torchrun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert not slurm_env(torchrun) and torchrun["RANK"] == "3"
    assert not slurm_env({})  # not under SLURM
    assert first_host("node7") == "node7" and first_host("a[10-12,15],b1") == "a10"


def test_local_rank_flag_and_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    apply_local_rank_flag(3)
    assert os.environ["LOCAL_RANK"] == "3"
    apply_local_rank_flag(1)  # the environment wins where both exist
    assert os.environ["LOCAL_RANK"] == "3"
    sys.path.insert(0, str(REPO))
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

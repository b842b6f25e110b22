"""benchmarks/gpu.sh, gpu_bench.py and gpu_smoke.py: the smoke run on the CPU reports every
bench section with finite numbers and every check's CPU form passing (so the scripts are ready
before a GPU is lent); the fp16 warm-up, the FLOP counter's failure, the host-sync summary and
the time budgets behave."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("train_step", "host_syncs", "ddp", "test_pass", "segmenters", "optimizers")
# What every training-step row must report (the CPU has no peak memory: a string there).
TRAIN_METRICS = ("it_s", "img_s", "step_ms", "tflop_per_step", "mfu", "outside_nets_share",
                 "outside_nets_share_with_loss")


# What the checks' CPU forms give: status, and for skipped ones the start of the reason.
CPU_CHECKS = {"hsv_tables": "skipped", "strong_aug": "ok", "train_compile": "skipped", "sigterm_resume": "ok",
              "train_fp16_cl": "skipped", "train_bf16": "ok", "first_stage_cuda": "skipped",
              "first_stage_cuda0": "skipped", "first_stage_cpu": "ok"}


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench():
    return _load("gpu_bench")


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)):
        yield x


def test_smoke_run_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)  # $OUT would take precedence over --out
    t = time.perf_counter()
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--smoke",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    print(f"gpu.sh --device cpu --smoke: {time.perf_counter() - t:.1f} s")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {"date", "torch", "cuda", "cudnn", "nccl", "device_name", "git_commit"} <= set(data["meta"])
    sections = data["sections"]
    assert set(sections) == set(SECTIONS)
    assert sections["host_syncs"]["status"] == "n/a (cpu)"
    for name in SECTIONS:
        assert "error" not in sections[name], (name, sections[name].get("error"))
        for row in sections[name]["rows"]:
            assert row["error"] is None, (name, row["measured"], row["error"])
            assert row["settings"] and row["metrics"], (name, row["measured"])
        if name != "host_syncs":
            assert sections[name]["rows"], name
    for name in ("train_step", "ddp", "segmenters", "optimizers"):
        for row in sections[name]["rows"]:
            assert set(TRAIN_METRICS) <= set(row["metrics"]), (name, row["measured"], sorted(row["metrics"]))
            assert row["metrics"]["it_s"] > 0 and row["metrics"]["tflop_per_step"] > 0
            assert 0 < row["metrics"]["outside_nets_share"] < 1
            assert "parts_warning" not in row["metrics"], row["metrics"]["parts_warning"]
            assert "flops_error" not in row["metrics"], row["metrics"]["flops_error"]
            assert "skipped_steps" not in row["metrics"]  # no GradScaler on the CPU
    # fp32 and bf16, NCHW and channels_last; fp32 only where the CPU emulates bf16 (gpu_bench.make_plan)
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert len(sections["train_step"]["rows"]) == (4 if native_bf16 else 2)
    assert len(sections["test_pass"]["rows"]) == (4 if native_bf16 else 2)
    assert len(sections["optimizers"]["rows"]) == 3
    numbers = list(_numbers(sections))
    assert numbers and all(math.isfinite(x) for x in numbers)
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "| measured |" in md and "## 6. Optimiser implementations" in md and "MFU" in md
    assert "skipped steps |" in md and "NCCL" in md

    smoke = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert {"torch", "cuda", "cudnn", "nccl", "git_commit"} <= set(smoke["meta"])
    rows = {r["check"]: r for r in smoke["checks"]}
    statuses = {k: r["status"] for k, r in rows.items()}
    assert statuses == CPU_CHECKS, {k: (r["status"], r["error"]) for k, r in rows.items()}
    for name, row in rows.items():
        if row["status"] == "skipped":
            assert row["error"].startswith("cpu:"), (name, row["error"])
        else:
            assert row["error"] is None and row["seconds"] > 0, (name, row["error"])
            assert all(math.isfinite(x) for x in _numbers(row["numbers"])), (name, row["numbers"])
            assert all((tmp_path / log).is_file() for log in row["logs"]), (name, row["logs"])
    aug = rows["strong_aug"]["numbers"]
    assert aug["compared"] == "cpu batched vs cpu per image" and aug["changed_share"] > 0.1
    train = rows["train_bf16"]["numbers"]
    assert train["iterations"] == train["expected_iterations"] == smoke["plan"]["iters_per_epoch"] == 8
    assert 0 <= train["msc_flip_miou"] <= 1 and train["train_s"] > 0 and train["test_s"] > 0
    # A SIGTERM to the whole process group (loader workers too) stops the run with 143 and a
    # mid-epoch checkpoint, and the resume finishes the epoch.
    term = rows["sigterm_resume"]["numbers"]
    assert term["signalled_after_iteration"] >= 1 and term["rc"] == 143 and term["resume_rc"] == 0
    assert 1 <= term["ckpt_iteration"] < term["iters_per_epoch"]
    first = rows["first_stage_cpu"]["numbers"]
    assert first["rc"] == 0 and first["irn_pseudo_label_written"] == first["irn_mask_written"] == 16
    smoke_md = (tmp_path / "gpu_smoke.md").read_text()
    assert all(f"| {name} |" in smoke_md for name in CPU_CHECKS)


def test_sync_summary_separates_the_allowed_transfer():
    bench = _bench()
    path, line = bench.allowed_sync_line()
    assert line > 0 and ".cpu()" in (REPO / path).read_text().splitlines()[line - 1]

    def warning(file: str, lineno: int, text: str = "called a synchronizing CUDA operation"):
        return warnings.WarningMessage(UserWarning(text), UserWarning, file, lineno)

    log = [warning(str(REPO / path), line), warning(str(REPO / "engine" / "beco.py"), 3),
           warning(str(REPO / "main.py"), 1, "something else"),
           warning(str(REPO / "benchmarks" / "gpu_bench.py"), 1), warning(str(REPO / path), line)]
    s = bench.summarise_syncs(log, in_step=2)
    assert (s["training_step_syncs"], s["training_step_allowed"], s["training_step_unexpected"]) == (2, 1, 1)
    assert s["iteration_syncs"] == 4  # the non-sync warning is not counted
    where = {(x["in"], x["where"]): x["count"] for x in s["locations"]}
    assert where[("training_step", f"{path}:{line}")] == 1
    assert where[("rest of iteration", f"{path}:{line}")] == 1
    assert where[("training_step", "engine/beco.py:3")] == 1


def test_rows_past_the_budget_are_recorded_as_skipped(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    bench = _bench()
    rc = bench.main(["--device", "cpu", "--only", "ddp,optimizers", "--budget-s", "0", "--out", str(tmp_path)])
    assert rc == 1  # skipped rows count as errors: the run did not measure them
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = [r for s in data["sections"].values() for r in s["rows"]]
    assert set(data["sections"]) == {"ddp", "optimizers"} and len(rows) == 4
    assert all(r["error"].startswith("skipped") for r in rows)
    assert data["budget"]["skipped_rows"] == 4
    assert "skipped" in (tmp_path / "gpu_bench.md").read_text()


class _FakeScaler:
    """A GradScaler's interface: every iteration of ``overflowing`` halves the scale, as
    GradScaler.update does after a skipped step."""

    def __init__(self, overflowing: int, enabled: bool = True):
        self.scale, self.overflowing, self.enabled, self.iterations = 65536.0, overflowing, enabled, 0

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        assert self.enabled, "a disabled scaler's scale means nothing"
        return self.scale

    def iteration(self) -> None:
        self.iterations += 1
        if self.overflowing:
            self.overflowing -= 1
            self.scale /= 2


def test_fp16_warm_up_runs_until_the_scale_stops_dropping():
    bench = _bench()
    s = _FakeScaler(overflowing=5)
    assert bench.warm_up(s.iteration, s, iters=3) == (3, True)  # 5 overflow, the 6th passes
    assert s.iterations == 6 and s.scale == 65536.0 / 32
    s = _FakeScaler(overflowing=0)
    assert bench.warm_up(s.iteration, s, iters=3) == (0, True) and s.iterations == 3
    s = _FakeScaler(overflowing=0)
    assert bench.warm_up(s.iteration, s, iters=0) == (1, True)  # one iteration must be seen to pass
    s = _FakeScaler(overflowing=1000)
    assert bench.warm_up(s.iteration, s, iters=2, cap=50) == (50, False) and s.iterations == 52
    s = _FakeScaler(overflowing=5, enabled=False)  # bf16 / fp32: the warm-up only
    assert bench.warm_up(s.iteration, s, iters=3) == (0, True) and s.iterations == 3


def test_warm_up_with_a_real_grad_scaler_ends_on_a_step_taken():
    """torch's GradScaler (its CPU form) lowers the scale exactly on a skipped step: a gradient
    of scale * 1e34 overflows float32 at 2^16 and not at 2^15."""
    bench = _bench()
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)

    def iteration() -> None:
        opt.zero_grad()
        scaler.scale((w * 1e34).sum()).backward()
        scaler.step(opt)
        scaler.update()

    assert bench.warm_up(iteration, scaler, iters=0) == (2, True)
    assert scaler.get_scale() == 2.0 ** 15
    assert torch.equal(w.detach(), torch.full((3,), 1.0) - 0.1 * torch.tensor(1e34))  # one step, not two


def test_a_failing_flop_count_keeps_the_rows_speed(tmp_path, monkeypatch):
    bench = _bench()
    calls = []

    def broken(self):
        calls.append(1)
        raise RuntimeError("no flop formula for some op")

    monkeypatch.setattr(bench.Rig, "step_flops", broken)
    plan = bench.make_plan(bench.parse_args(["--device", "cpu", "--smoke", "--iters", "1", "--warmup", "0"]))
    b = bench.Bench(plan, tmp_path, [], "test")
    cfg = bench.row_config(plan, plan.deeplabv3plus, "fp32", 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the smoke run: a second thread on a busy 2-core host is many times slower
    try:
        rows = [b.row("train_step", f"row {i}", lambda: b.training(plan.deeplabv3plus[0], cfg, "fp32"))
                for i in (1, 2)]
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        assert row["error"] is None, row["error"]
        m = row["metrics"]
        assert m["it_s"] > 0 and m["img_s"] > 0 and m["step_ms"] > 0
        assert m["flops_error"] == "RuntimeError: no flop formula for some op"
        assert "mfu" not in m and "tflop_per_step" not in m
    assert len(calls) == 1  # the same nets and sizes are not counted again
    b.write()
    md = (tmp_path / "gpu_bench.md").read_text()
    assert md.count("**count failed:** RuntimeError: no flop formula for some op") == 2


def test_checks_past_their_budget_are_recorded_and_fail_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    smoke = _load("gpu_smoke")
    threads = torch.get_num_threads()
    try:
        rc = smoke.main(["--device", "cpu", "--checks", "strong_aug,train_bf16,train_compile",
                         "--checks-budget-s", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets the CPU checks' thread count
    assert rc == 1  # a check the budget left out is not a check passed
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu_smoke.json").read_text())["checks"]}
    assert {k: r["status"] for k, r in rows.items()} == dict.fromkeys(rows, "skipped")
    assert set(rows) == {"strong_aug", "train_bf16", "train_compile"}
    assert rows["strong_aug"]["error"].startswith("budget") and rows["train_bf16"]["error"].startswith("budget")
    assert rows["train_compile"]["error"].startswith("cpu:")  # not for the CPU at all: no budget question
    md = (tmp_path / "gpu_smoke.md").read_text()
    assert md.count("| **skipped** |") == 2 and md.count("| skipped |") == 1  # the budget's, not the CPU's, in bold


def _gpu_sh(tmp_path: Path, *args: str, smoke_rc: int = 0, bench_rc: int = 0) -> tuple[int, list[list[str]]]:
    """gpu.sh with a stand-in python that records each call and exits with the given codes."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "$1" = -c ]; then exit "${PROBE_RC:-0}"; fi\n'  # gpu.sh's probes: torch, the install
                    'echo "$*" >> "$CALLS"\necho "${PYTHONPATH:-}" >> "$CALLS.pythonpath"\n'
                    'case "$1" in *gpu_smoke.py) exit "$SMOKE_RC";; *) exit "$BENCH_RC";; esac\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), SMOKE_RC=str(smoke_rc), BENCH_RC=str(bench_rc))
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=30)
    lines = calls.read_text().splitlines() if calls.is_file() else []
    return r.returncode, [[Path(line.split()[0]).name, *line.split()[1:]] for line in lines]


def test_gpu_sh_runs_the_checks_then_the_bench_in_what_they_left_of_the_time(tmp_path):
    rc, calls = _gpu_sh(tmp_path, "--only", "ddp")
    assert rc == 0
    assert [c[0] for c in calls] == ["gpu_smoke.py", "gpu_bench.py"]
    assert calls[0][1:] == ["--only", "ddp"]
    flag, budget, *rest = calls[1][1:]
    assert flag == "--budget-s" and 430 <= int(budget) <= 440 and rest == ["--only", "ddp"]
    # The checks' failure is the run's exit code, and the bench still runs; else the bench's code.
    rc, calls = _gpu_sh(tmp_path, smoke_rc=1, bench_rc=0)
    assert rc == 1 and [c[0] for c in calls] == ["gpu_smoke.py", "gpu_bench.py"]
    assert _gpu_sh(tmp_path, smoke_rc=0, bench_rc=3)[0] == 3
    # Smoke sizes: both side by side, the bench without gpu.sh's time budget.
    rc, calls = _gpu_sh(tmp_path, "--device", "cpu", "--smoke", bench_rc=1)
    assert rc == 1
    assert sorted(calls) == [[script, "--device", "cpu", "--smoke"] for script in ("gpu_bench.py", "gpu_smoke.py")]


def test_gpu_sh_gives_a_python_without_the_install_the_same_package_names(tmp_path):
    """A GPU image's own python, without the editable install: the repo and `irn` (a link to
    first-stage/irn) reach it through PYTHONPATH."""
    fake = tmp_path / "python"
    _gpu_sh(tmp_path)  # writes the stand-in python
    (tmp_path / "calls.txt.pythonpath").unlink()
    calls = tmp_path / "calls.txt"
    calls.unlink()
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PROBE_RC": "1", "PYTHON": str(fake), "CALLS": str(calls), "SMOKE_RC": "0", "BENCH_RC": "0"})
    assert r.returncode == 0, r.stderr
    paths = (tmp_path / "calls.txt.pythonpath").read_text().splitlines()
    assert len(paths) == 2 and paths[0] == paths[1]
    repo, shim = paths[0].split(":")[:2]
    assert Path(repo) == REPO and (Path(shim) / "irn").resolve() == REPO / "first-stage" / "irn"

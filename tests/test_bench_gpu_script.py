"""benchmarks/gpu.sh and gpu_bench.py: the smoke run on the CPU reports every section with
finite numbers (so the script is ready before a GPU is lent), and the host-sync summary
and the time budget behave."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("train_step", "host_syncs", "ddp", "test_pass", "segmenters", "optimizers")
# What every training-step row must report (the CPU has no peak memory: a string there).
TRAIN_METRICS = ("it_s", "img_s", "step_ms", "tflop_per_step", "mfu", "outside_nets_share",
                 "outside_nets_share_with_loss")


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--smoke",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {"date", "torch", "cuda", "device_name", "git_commit"} <= set(data["meta"])
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
    assert len(sections["train_step"]["rows"]) == 4  # fp32 and bf16, NCHW and channels_last
    assert len(sections["test_pass"]["rows"]) == 4
    assert len(sections["optimizers"]["rows"]) == 3
    numbers = list(_numbers(sections))
    assert numbers and all(math.isfinite(x) for x in numbers)
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "| measured |" in md and "## 6. Optimiser implementations" in md and "MFU" in md


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

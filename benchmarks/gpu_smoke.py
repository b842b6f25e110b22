"""GPU smoke checks: what only a GPU can show, each check one pass / fail row, in about 3 minutes.

    bash benchmarks/gpu.sh                                             # these checks, then gpu_bench.py
    python benchmarks/gpu_smoke.py                                     # the checks alone (one H200: ~2-3 min)
    python benchmarks/gpu_smoke.py --device cpu --smoke --out /tmp/x   # their CPU forms (~30 s; the test suite's)
    python benchmarks/gpu_smoke.py --checks train_bf16,sigterm_resume  # some checks only

Writes gpu_smoke.json and gpu_smoke.md to $OUT when it is set, else to ``--out`` (default
benchmarks/results/), both rewritten after every check, and the console output of every
process a check starts to gpu_smoke_logs/ beside them. Each check runs in its own
try/except and writes one row: status ok / failed / skipped, its numbers, the error text and
its wall time. The meta holds the torch, CUDA, cuDNN and NCCL versions. Checks:

hsv_tables         ``engine.strong_aug._hsv_tables`` built on the GPU equal the CPU's (torch.equal,
                   both tables).
strong_aug         ``strong_augment`` on the GPU (its batched path) equals the CPU (per-image path)
                   on an (8,3,64,64) 0..255 batch with configs/beco_voc.yaml's method.strong_aug, the
                   (B,9) draws from a CPU generator seeded alike for both calls; if not equal, the
                   largest difference and the share of values that differ.
train_fp16_cl      main.py --config configs/demo.yaml for one epoch (96 synthetic images, 12
train_bf16         iterations, warm-up and co-training off so every part of the BECO step runs),
train_compile      then main.py --test with multi-scale + flip, under ``--amp train.amp_dtype=float16
                   train.channels_last=true``, ``--amp train.amp_dtype=bfloat16`` and
                   ``train.compile=true``: exit 0, one finite loss per iteration in train_log.jsonl,
                   latest_ckpt.pth and best_ckpt.pth, the results card (results.md, results.json with
                   a msc+flip row); wall times.
sigterm_resume     main.py for one epoch with data.num_workers=2, in its own session; once
                   train_log.jsonl shows iteration 1, SIGTERM to the whole process group (as a
                   scheduler preempts: the loader workers get it too). Expected: exit 143 and a
                   latest_ckpt.pth from mid-epoch; then ``--ckpt <run>/latest_ckpt.pth``: exit 0 and
                   every iteration of the epoch logged once, with a finite loss.
first_stage_cuda   first-stage/irn/run_sample.py --steps all on 16 synthetic images (ResNet-18, one
first_stage_cuda0  CAM and one IRN epoch) with --device cuda and --device cuda:0: exit 0 and a
                   pseudo-label and a mask exported for every image.

The processes run side by side, ``--jobs`` at a time (default 3 on a GPU machine: the demo-sized
runs leave an H200 mostly idle), so their wall times include that sharing. ``--checks-budget-s``
(default 180) bounds the whole: no check starts in its last 20 s, and a process still running
at its end is killed (its check fails, saying so). Exit code 1 if a check failed or the budget
left one out; checks that cannot run on the device (below) are skipped and do not count.

``--device cpu`` runs what the CPU can: strong_aug compares the CPU's batched path with its
per-image path (the same draws), train_bf16, sigterm_resume, and the first stage once
(first_stage_cpu); fp16 autocast is GPU-only and torch.compile would take minutes, so
train_fp16_cl, train_compile and hsv_tables are recorded as skipped (cpu), and two checks run
at a time, each process on one thread. ``--smoke`` shrinks the data (16 images of 48 x 48,
batch 2, 8 iterations an epoch; the first stage's images 48 x 64).

gpu.sh passes its arguments to both scripts, so this one takes gpu_bench.py's options too and
uses --device, --smoke, --out and --commit of them; its own options (--checks, --jobs, ...)
are for running it directly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks import gpu_bench  # noqa: E402  (its options, metadata and table helpers)
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.synthetic.voc import make_synthetic_voc, make_synthetic_voc_from_config
from engine.strong_aug import _hsv_tables, strong_augment
from engine.config import load_config
from utils.config import Config

REPO = Path(__file__).resolve().parents[1]

MAIN_PY = REPO / "main.py"
RUN_SAMPLE = REPO / "first-stage" / "irn" / "run_sample.py"
DEMO = REPO / "configs" / "demo.yaml"
LOG_DIR = "gpu_smoke_logs"
LAST_START_S = 20.0  # no check starts with less of the budget left: none finishes that fast

# The demo's synthetic set, shrunk: its images, crops and batch on a GPU (96 images: 12
# iterations an epoch), CPU-sized in --smoke (8 iterations an epoch).
MAIN_DATA = {
    False: ["data.synthetic.train=96", "data.synthetic.val=16", "data.synthetic.test=1"],
    True: ["data.synthetic.train=16", "data.synthetic.val=2", "data.synthetic.test=1",
           "data.synthetic.size=[48,48]", "data.synthetic.classes=3", "data.num_classes=4",
           "data.crop_size=48", "data.val_size=48", "data.batch_size=2"],
}
# Online labels, co-training, mixing and the strong augmentation from the first iteration, so
# the one epoch runs every part of the BECO step (the demo waits 4 epochs for them).
MAIN_RUN = ["train.epochs=1", "train.num_vis=0", "method.warmup_epochs=0", "method.co_training_start_epoch=0"]
MSC_FLIP = ["test.multi_scale=true", "test.flip=true"]

# main.py's variants (on the CPU --amp is bfloat16 whatever train.amp_dtype says).
TRAIN_VARIANTS = {
    "train_fp16_cl": ["--amp", "train.amp_dtype=float16", "train.channels_last=true"],
    "train_bf16": ["--amp", "train.amp_dtype=bfloat16"],
    "train_compile": ["train.compile=true"],
}

# First stage on 16 images: (image size, crop, --cam_resize_long), the demo's on a GPU.
FIRST_STAGE_SIZES = {False: ((96, 128), 96, "96,160"), True: ((48, 64), 48, "40,64")}
FIRST_STAGE_IMAGES = 16

# In the order they start: the slowest (torch.compile's compilation) first.
CHECKS = ("hsv_tables", "strong_aug", "train_compile", "sigterm_resume", "train_fp16_cl", "train_bf16",
          "first_stage_cuda", "first_stage_cuda0", "first_stage_cpu")
IN_PROCESS = ("hsv_tables", "strong_aug")
# Checks the CPU cannot run, and why (recorded as skipped, not failed).
CPU_SKIPS = {"hsv_tables": "one device, nothing to compare",
             "train_fp16_cl": "fp16 autocast and its GradScaler are GPU-only",
             "train_compile": "torch.compile on the CPU takes minutes",
             "first_stage_cuda": "first_stage_cpu runs instead",
             "first_stage_cuda0": "first_stage_cpu runs instead"}
GPU_SKIPS = {"first_stage_cpu": "first_stage_cuda and first_stage_cuda0 run instead"}


class Failed(Exception):
    """A check's expectation did not hold (the message says which)."""


class Skipped(Exception):
    """A check that cannot run here (the message says why)."""


# ----------------------------------------------------------------------------- processes

def tail(log: Path, lines: int = 1) -> str:
    """The last ``error:`` line of a process's output, else its last lines (progress bars'
    carriage returns split as lines)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no output)"
    rows = [r.strip() for r in text.replace("\r", "\n").splitlines() if r.strip()]
    errors = [r for r in rows if r.startswith("error:") or "Error" in r.split(":")[0]]
    picked = errors[-1:] if errors else rows[-lines:]
    return " | ".join(picked)[:400] or "(no output)"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process's session (its loader workers and spawned helpers with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_iters(path: Path) -> list[dict]:
    """train_log.jsonl's complete lines (a line still being written is left out)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


# ----------------------------------------------------------------------------- the checks

class Smoke:
    """Runs the checks, keeps their rows, writes gpu_smoke.json and gpu_smoke.md."""

    def __init__(self, args: argparse.Namespace, out_dir: Path, work: Path, argv: list[str]):
        self.args = args
        self.device = torch.device(args.device)
        self.gpu = self.device.type == "cuda"
        self.smoke = args.smoke
        self.out_dir = out_dir
        self.logs = out_dir / LOG_DIR
        self.work = work
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.proc_threads)}
        self.env.pop("OUT", None)  # the processes write under the work folder, not into the results
        # data.root in the work folder: the demo config's relative one would land in the repo.
        self.main_overrides = [*MAIN_DATA[self.smoke], *MAIN_RUN, f"data.root={work / 'data'}"]
        self.cfg: Config = load_config(DEMO, self.main_overrides)
        self._data: dict[str, Any] = {}
        self.data: dict[str, Any] = {
            "meta": {**gpu_bench.meta(self.device, argv, args.commit),
                     "command": " ".join(["benchmarks/gpu_smoke.py", *argv])},
            "plan": {"device": args.device, "smoke": self.smoke, "jobs": args.jobs,
                     "budget_s": args.checks_budget_s, "proc_threads": args.proc_threads,
                     "main_overrides": self.main_overrides,
                     "iters_per_epoch": self.iters_per_epoch()},
            "checks": [], "time": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.args.checks_budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[smoke {self.elapsed():6.1f} s] {msg}", flush=True)

    def iters_per_epoch(self) -> int:
        return self.cfg.data.synthetic.train // self.cfg.data.batch_size  # drop_last, one process

    # -- running

    def check(self, name: str) -> dict:
        """Run one check into its row; a failure or an error is recorded, never raised."""
        row: dict[str, Any] = {"check": name, "status": "ok", "seconds": 0.0, "numbers": {}, "error": None,
                               "logs": []}
        t = time.perf_counter()
        try:
            not_here = GPU_SKIPS.get(name) if self.gpu else CPU_SKIPS.get(name)
            if not_here:
                raise Skipped(f"{self.device.type}: {not_here}")
            if self.remaining() < LAST_START_S:
                raise Skipped(f"budget: under {LAST_START_S:.0f} s of the {self.args.checks_budget_s:.0f} s left")
            self.log(f"{name} ...")
            getattr(self, name)(row)
        except Skipped as e:
            row["status"], row["error"] = "skipped", str(e)
        except Failed as e:
            row["status"], row["error"] = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - one check's error must not stop the others
            row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}".splitlines()[0][:500]
            traceback.print_exc(file=sys.stderr)
        row["seconds"] = time.perf_counter() - t
        self.log(f"{name}: {row['status']} ({row['seconds']:.1f} s)" + (f": {row['error']}" if row["error"] else ""))
        with self.lock:
            self.data["checks"].append(row)
            self.write()
        return row

    def proc(self, row: dict, label: str, cmd: list[Any]) -> tuple[int, float, Path]:
        """Run a process in its own session, its output to the log folder, killed (with its
        children) when the budget runs out; returns (exit code, seconds, log)."""
        log = self.logs / f"{label}.log"
        row["logs"].append(str(log.relative_to(self.out_dir)))
        t = time.perf_counter()
        with open(log, "w") as f:
            p = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=max(1.0, self.remaining()))
            except subprocess.TimeoutExpired:
                kill_group(p)
                raise Failed(f"{label}: still running when the {self.args.checks_budget_s:.0f} s budget ran out "
                             f"(killed after {time.perf_counter() - t:.0f} s): {tail(log)}")
        return rc, time.perf_counter() - t, log

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """Data made once for all checks that need it (the first caller makes it, in a lock, so
        side-by-side checks never write the same set); a failure is re-raised to every caller."""
        with self.lock:
            if key not in self._data:
                try:
                    self._data[key] = make()
                except Exception as e:  # noqa: BLE001
                    self._data[key] = e
            value = self._data[key]
        if isinstance(value, Exception):
            raise Failed(f"making the {key} data failed: {type(value).__name__}: {value}".splitlines()[0][:500])
        return value

    def main_data(self) -> Path:
        """The demo's synthetic set at this run's sizes, as main.py would generate it (the same
        settings, so main.py finds it and writes nothing)."""
        def make() -> Path:
            root = Path(self.cfg.data.root)
            make_synthetic_voc_from_config(root, self.cfg.data.synthetic, progress=False)
            return root
        return self.shared("main.py", make)

    def main_args(self, tag: str, *extra: str) -> list[str]:
        return [sys.executable, MAIN_PY, "--config", DEMO, "--logging_path_base", self.work / tag, "--logging_tag", tag,
                *self.main_overrides, *extra]

    def run_dir(self, tag: str) -> Path:
        """main.py's run folder for ``main_args(tag)``: each run has a folder of its own."""
        return self.work / tag / tag

    # -- in-process checks

    def hsv_tables(self, row: dict) -> None:
        on_cpu, on_gpu = _hsv_tables(torch.device("cpu")), _hsv_tables(self.device)
        n = row["numbers"]
        for name, c, g in zip(("rgb2hsv", "hsv2rgb"), on_cpu, on_gpu):
            g = g.cpu()
            n[f"{name}_entries"] = c.numel()
            n[f"{name}_differing"] = int((g != c).sum()) if g.shape == c.shape else c.numel()
        bad = [k for k in ("rgb2hsv", "hsv2rgb") if n[f"{k}_differing"]]
        if bad:
            raise Failed(f"the GPU's tables differ from the CPU's: {', '.join(bad)}")

    def strong_aug(self, row: dict) -> None:
        cfg = load_config(REPO / "configs" / "beco_voc.yaml").method.strong_aug
        images = torch.randint(0, 256, (8, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()

        def draws() -> torch.Generator:
            # A CPU generator for both calls: strong_augment draws on its device and moves the draws.
            return torch.Generator().manual_seed(1)

        reference = strong_augment(images, cfg, generator=draws(), per_image=True)
        n = row["numbers"]
        if self.gpu:
            other = strong_augment(images.to(self.device), cfg, generator=draws()).cpu()
            n["compared"] = f"{self.device.type} (batched) vs cpu (per image)"
        else:
            other = strong_augment(images, cfg, generator=draws(), per_image=False)
            n["compared"] = "cpu batched vs cpu per image"
        # The augmentation must have changed the images, or equal outputs would show nothing.
        n["changed_share"] = float((reference != images).float().mean())
        if n["changed_share"] == 0:
            raise Failed("the augmentation left every value unchanged: nothing was compared")
        if not torch.equal(other, reference):
            diff = (other - reference).abs()
            n["max_abs_diff"] = float(diff.max())
            n["differing_share"] = float((diff > 0).float().mean())
            raise Failed(f"{n['compared']}: outputs differ (max |diff| {n['max_abs_diff']:g}, "
                         f"{100 * n['differing_share']:.3f} % of values)")

    # -- main.py

    def _train(self, row: dict, name: str) -> None:
        flags = TRAIN_VARIANTS[name]
        self.main_data()
        n, run = row["numbers"], self.run_dir(name)
        rc, n["train_s"], log = self.proc(row, f"{name}-train", self.main_args(name, *flags))
        n["train_rc"] = rc
        if rc != 0:
            raise Failed(f"main.py exited {rc}: {tail(log)}")
        problems = []
        losses = [x["total"] for x in read_iters(run / "train_log.jsonl")]
        n["iterations"], n["expected_iterations"] = len(losses), self.iters_per_epoch()
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if len(losses) != n["expected_iterations"]:
            problems.append(f"train_log.jsonl has {len(losses)} iterations, expected {n['expected_iterations']}")
        if bad:
            problems.append(f"non-finite loss at iterations {bad[:5]}")
        elif losses:
            n["first_loss"], n["last_loss"] = losses[0], losses[-1]
        problems += [f"no {f}" for f in ("latest_ckpt.pth", "best_ckpt.pth") if not (run / f).is_file()]
        rc, n["test_s"], log = self.proc(row, f"{name}-test", self.main_args(name, *flags, "--test", *MSC_FLIP))
        n["test_rc"] = rc
        if rc != 0:
            problems.append(f"main.py --test exited {rc}: {tail(log)}")
        else:
            problems += [f"no {f} after --test" for f in ("results.md", "results.json") if not (run / f).is_file()]
            if (run / "results.json").is_file():
                rows = json.loads((run / "results.json").read_text()).get("rows", {})
                msc = [r for r in rows.values() if r.get("inference") == "msc+flip" and r.get("net") == "mean"]
                if not msc:
                    problems.append("the results card has no multi-scale + flip row")
                else:
                    n["msc_flip_miou"] = msc[-1]["miou"]
        if problems:
            raise Failed("; ".join(problems))

    def train_fp16_cl(self, row: dict) -> None:
        self._train(row, "train_fp16_cl")

    def train_bf16(self, row: dict) -> None:
        self._train(row, "train_bf16")

    def train_compile(self, row: dict) -> None:
        self._train(row, "train_compile")

    def sigterm_resume(self, row: dict) -> None:
        self.main_data()
        n, tag = row["numbers"], "sigterm_resume"
        run = self.run_dir(tag)
        # One epoch: the signal lands a few iterations into it, and the resume finishes it.
        args = self.main_args(tag, "data.num_workers=2")
        total = self.iters_per_epoch()
        log = self.logs / f"{tag}-train.log"
        row["logs"].append(str(log.relative_to(self.out_dir)))
        t = time.perf_counter()
        with open(log, "w") as f:
            # Its own session, so killpg reaches main.py and its loader workers and nothing else.
            p = subprocess.Popen([str(a) for a in args], cwd=REPO, env=self.env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                seen = -1
                while p.poll() is None and self.remaining() > 0:
                    seen = max((x["iter"] for x in read_iters(run / "train_log.jsonl")), default=-1)
                    if seen >= 1:
                        break
                    time.sleep(0.02)
                if p.poll() is not None:
                    raise Failed(f"main.py exited {p.returncode} before iteration 1 was logged: {tail(log)}")
                if seen < 1:
                    kill_group(p)
                    raise Failed("iteration 1 was not logged within the budget")
                n["signalled_after_iteration"], n["signalled_at_s"] = seen, time.perf_counter() - t
                os.killpg(p.pid, signal.SIGTERM)
                rc = p.wait(timeout=max(1.0, self.remaining()))
            except subprocess.TimeoutExpired:
                kill_group(p)
                raise Failed(f"main.py still ran {time.perf_counter() - t:.0f} s after SIGTERM (budget spent)")
            finally:
                if p.poll() is None:
                    kill_group(p)
        n["rc"], n["signal_to_exit_s"] = rc, time.perf_counter() - t - n["signalled_at_s"]
        problems = []
        if rc != 143:
            problems.append(f"SIGTERM to the process group: exit {rc}, expected 143: {tail(log)}")
        latest = run / "latest_ckpt.pth"
        if not latest.is_file():
            raise Failed("; ".join(problems + ["no latest_ckpt.pth to resume from"]))
        it = torch.load(latest, map_location="cpu", weights_only=True)["iteration"]
        n["ckpt_iteration"], n["iters_per_epoch"] = it, self.iters_per_epoch()
        if it % self.iters_per_epoch() == 0:
            problems.append(f"latest_ckpt.pth is from iteration {it}, an epoch's end, not mid-epoch")
        rc, n["resume_s"], log = self.proc(row, f"{tag}-resume", [*args, "--ckpt", latest])
        n["resume_rc"] = rc
        if rc != 0:
            problems.append(f"the resume exited {rc}: {tail(log)}")
        else:
            logged = read_iters(run / "train_log.jsonl")
            if [x["iter"] for x in logged] != list(range(total)):
                problems.append(f"after the resume train_log.jsonl holds iterations "
                                f"{[x['iter'] for x in logged]}, expected 0..{total - 1} once each")
            if not all(math.isfinite(x["total"]) for x in logged):
                problems.append("a logged loss is not finite")
        if problems:
            raise Failed("; ".join(problems))

    # -- first stage

    def _first_stage(self, row: dict, device: str) -> None:
        (height, width), crop, resize_long = FIRST_STAGE_SIZES[self.smoke]

        def make() -> Path:
            root = self.work / "first_stage_data"
            make_synthetic_voc(root, train=FIRST_STAGE_IMAGES, val=4, test=1, size=(height, width), classes=3,
                               seed=0, colours="class", object_scale=(0.22, 0.4), max_objects=3)
            return root
        voc = self.shared("first stage", make) / "VOC2012"
        out = self.work / f"first_stage_{device.replace(':', '')}"
        cmd = [sys.executable, RUN_SAMPLE, "--voc12_root", voc, "--work_dir", out / "work", "--steps", "all",
               "--export_to", out / "export", "--device", device, "--seed", "0", "--no_progress",
               "--num_workers", 2 if self.gpu else 0, "--torch_threads", self.args.proc_threads,
               "--backbone_depth", 18, "--backbone_bn", "batch", "--cam_freeze_until", "none",
               "--cam_crop_size", crop, "--cam_resize_long", resize_long, "--cam_batch_size", 8,
               "--cam_num_epoches", 1, "--cam_scales", "1.0,0.5", "--irn_crop_size", crop, "--irn_batch_size", 8,
               "--irn_num_epoches", 1, "--irn_backbone_from_cam", "true", "--radius", 5, "--exp_times", 2]
        n = row["numbers"]
        rc, n["run_s"], log = self.proc(row, f"first_stage_{device.replace(':', '')}", cmd)
        n["rc"] = rc
        if rc != 0:
            raise Failed(f"run_sample.py --device {device} exited {rc}: {tail(log)}")
        ids = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
        problems = []
        for kind in (PSEUDO_LABEL_DIR, MASK_DIR):
            missing = [i for i in ids if not (out / "export" / kind / f"{i}.png").is_file()]
            n[f"{kind}_written"] = len(ids) - len(missing)
            if missing:
                problems.append(f"{len(missing)} of {len(ids)} {kind} files missing (first: {missing[0]})")
        steps = json.loads((out / "work" / "summary.json").read_text()).get("steps", {})
        miou = steps.get("eval_sem_seg", {}).get("metrics", {}).get("sem_seg_miou")
        if miou is not None:
            n["pseudo_label_miou"] = miou
        if problems:
            raise Failed("; ".join(problems))

    def first_stage_cuda(self, row: dict) -> None:
        self._first_stage(row, "cuda")

    def first_stage_cuda0(self, row: dict) -> None:
        self._first_stage(row, f"cuda:{self.device.index or 0}")

    def first_stage_cpu(self, row: dict) -> None:
        self._first_stage(row, "cpu")

    # -- output

    def write(self) -> None:
        self.data["time"] = {"total_s": self.elapsed(), "budget_s": self.args.checks_budget_s}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_smoke.json").write_text(json.dumps(self.data, indent=1) + "\n")
        (self.out_dir / "gpu_smoke.md").write_text(markdown(self.data))


def unchecked(row: dict) -> bool:
    """A check that failed, or that the budget left out (unchecked is not passed); one the
    device cannot run is neither."""
    return row["status"] == "failed" or (row["status"] == "skipped" and row["error"].startswith("budget"))


def markdown(data: dict) -> str:
    m, plan = data["meta"], data["plan"]
    order = {c: i for i, c in enumerate(CHECKS)}
    rows = []
    for r in sorted(data["checks"], key=lambda r: order.get(r["check"], len(order))):
        numbers = ", ".join(f"{k} {gpu_bench.fmt(v)}" for k, v in r["numbers"].items())
        status = f"**{r['status']}**" if unchecked(r) else r["status"]
        rows.append([r["check"], status, f"{r['seconds']:.1f}", numbers.replace("|", "\\|"),
                     (r["error"] or "").replace("|", "\\|"), "<br>".join(r["logs"])])
    t = data["time"]
    return "\n".join([
        "# BECO GPU smoke checks", "",
        f"{m['date']} · {m['device_name']} · torch {m['torch']} · CUDA {m['cuda']} · cuDNN {m['cudnn']} · "
        f"NCCL {m['nccl']} · commit {m['git_commit']}", "",
        f"`{m['command']}`{' (smoke sizes)' if plan['smoke'] else ''}: up to {plan['jobs']} processes side by side, "
        f"{plan['proc_threads']} torch thread(s) each; {t.get('total_s', 0):.0f} s of the {plan['budget_s']:.0f} s "
        f"budget. What each check runs and expects: benchmarks/gpu_smoke.py's docstring.", "",
        *gpu_bench._table(["check", "status", "wall s", "numbers", "error / reason", "console output"], rows)])


# ----------------------------------------------------------------------------- entry point

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[gpu_bench.build_parser(add_help=False)], allow_abbrev=False)
    own = p.add_argument_group("gpu_smoke.py's own options")
    own.add_argument("--checks", default="", help=f"comma-separated checks out of {','.join(CHECKS)} (default: all)")
    own.add_argument("--jobs", type=int, default=None,
                     help="checks side by side (default 3 on a GPU machine, 2 on the CPU)")
    own.add_argument("--checks-budget-s", type=float, default=180.0,
                     help="seconds for all checks: none starts in the last 20, processes still running at the end "
                          "are killed (default: %(default)s)")
    own.add_argument("--proc-threads", type=int, default=None,
                     help="torch threads of each process (OMP_NUM_THREADS; default: the cores shared among --jobs "
                          "on a GPU machine, 1 on the CPU)")
    own.add_argument("--work", default=None,
                     help="folder for the runs' data and checkpoints (default: a temporary folder, deleted after)")
    args = p.parse_args(argv)
    unknown = set(filter(None, args.checks.split(","))) - set(CHECKS)
    if unknown:
        p.error(f"unknown checks {sorted(unknown)}; expected some of {list(CHECKS)}")
    gpu = args.device.startswith("cuda")
    if args.jobs is None:
        args.jobs = 3 if gpu else 2
    if args.proc_threads is None:
        # One thread on the CPU: a second one, on a 2-core host the bench shares, makes
        # oneDNN's bf16 kernels wait on a descheduled thread (10x slower, measured).
        args.proc_threads = max(1, (os.cpu_count() or 1) // args.jobs) if gpu else 1
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke.py: no CUDA device here; run with --device cpu", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.proc_threads)  # the in-process checks, as their processes
    out_dir = gpu_bench.results_dir(args.out)
    (out_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args, out_dir, work, argv)
    try:
        chosen = [c for c in CHECKS if not args.checks or c in args.checks.split(",")]
        m = smoke.data["meta"]
        smoke.log(f"{m['device_name']} | torch {m['torch']} CUDA {m['cuda']} cuDNN {m['cudnn']} NCCL {m['nccl']} | "
                  f"{len(chosen)} checks, {args.jobs} side by side, budget {args.checks_budget_s:.0f} s | "
                  f"results -> {out_dir}")
        smoke.write()
        for name in [c for c in chosen if c in IN_PROCESS]:
            smoke.check(name)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(smoke.check, [c for c in chosen if c not in IN_PROCESS]))
        smoke.write()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failures = [r for r in smoke.data["checks"] if unchecked(r)]
    for r in failures:
        print(f"error: {r['check']}: {r['status']}: {r['error']}", file=sys.stderr, flush=True)
    print("checks: " + ", ".join(f"{r['check']} {r['status']}" for r in smoke.data["checks"])
          + f" | {smoke.elapsed():.1f} s | wrote {out_dir / 'gpu_smoke.json'} and {out_dir / 'gpu_smoke.md'}",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

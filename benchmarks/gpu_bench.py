"""GPU benchmark of the BECO training step, its settings and the test pass, in one run.

    bash benchmarks/gpu.sh                                     # gpu_smoke.py's checks, then this: under 8 min
    bash benchmarks/gpu.sh --device cpu --smoke --out /tmp/x   # tiny sizes on the CPU (~30 s): checks the scripts
    python benchmarks/gpu_bench.py                             # this alone (one H100/H200: about 5 min)
    python benchmarks/gpu_bench.py --only train_step,host_syncs --iters 20   # some sections, more iterations
    python benchmarks/gpu_bench.py --peak-tflops 312           # MFU against another chip's dense bf16 peak (A100)

Writes gpu_bench.json and gpu_bench.md to $OUT when it is set, else to ``--out`` (default
benchmarks/results/); both are rewritten after every section, so a run cut short keeps
what it measured. Sections (each row in its own try/except, so a failing row records
its error and the rest still run):

1. train_step: the BECO iteration with 2 x DeepLabV3+ R101 (configs/beco_voc.yaml) at
   512 x 512, B = 4 and 8, fp32 / AMP fp16 (GradScaler) / AMP bf16, NCHW and channels_last:
   it/s, img/s, peak memory, MFU and the share of the step outside the networks. fp16 rows
   warm up until the loss scale stops dropping (``warm_up``) and report the optimiser steps
   the scaler skipped while timed; a failing FLOP count leaves the row its speed (``flops_error``).
2. host_syncs: ``torch.cuda.set_sync_debug_mode("warn")`` over one iteration; the warnings
   counted inside ``training_step`` and over the whole iteration, with their source lines.
3. ddp: the same step in a 1-process DistributedDataParallel group (NCCL; gloo on the CPU),
   SyncBatchNorm on the GPU.
4. test_pass: two nets averaged (``engine.inference.predict_maps``, which averages with
   ``engine.evaluate.average_outputs``), batch 1, single scale and multi-scale + flip.
5. segmenters: DeepLabV2-R101 and SegFormer-B2 training steps, bf16, B = 4.
6. optimizers: ``optim.implementation`` default / foreach / fused on the R101 bf16 B = 4 step.

Nets are built as a training run builds them (``models.build_model`` without ImageNet weights,
``utils.runtime.net_layout``), the iteration is the training loop's own ``engine.trainer.train_step``
(zero_grad, ``training_step``, scaled backward, ``scaler.step``, ``scaler.update``) followed by the
loss terms fetched in one transfer, and the backends are set by utils.runtime.configure_backends (cuDNN benchmark on, TF32 on). The batch
is random, pinned on the host as the loader hands it over: no data loading is measured.
``--smoke`` keeps every code path but shrinks the work: ResNet-18 / MiT-B0 nets, 64 x 64,
B = 2, fp32 and bf16 only (fp32 only on a CPU without bfloat16 instructions, which emulates bf16
autocast some ten times slower), 1 warm-up + 2 timed iterations.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import linecache
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import engine.beco as beco  # noqa: E402  (its globals are wrapped to time the non-network parts)
from engine.beco import num_nets, training_step
from engine.inference import build_test_nets, predict_maps
from engine.trainer import Run, train_step
from models import build_model, build_optimizer
from engine.config import load_config
from utils.config import Config, to_dict
from utils.distributed import DistInfo, free_port
from utils.runtime import (configure_backends, make_autocast, net_layout, set_seed,
                           uses_grad_scaler)

REPO = Path(__file__).resolve().parents[1]

DEFAULT_OUT = REPO / "benchmarks" / "results"
SECTIONS = ("train_step", "host_syncs", "ddp", "test_pass", "segmenters", "optimizers")

PRECISIONS: dict[str, list[str]] = {
    "fp32": ["train.amp=false"],
    "fp16": ["train.amp=true", "train.amp_dtype=float16"],
    "bf16": ["train.amp=true", "train.amp_dtype=bfloat16"],
}

# The non-network parts of beco_step, by the engine.beco global each is called through.
# beco_loss is the loss's forward only (its backward runs inside the nets' backward).
OUTSIDE_PARTS = {"confident_labels": "online labels (softmax + max)",
                 "mix_batch": "boundary-enhanced mixing",
                 "augment": "strong augmentation"}
LOSS_PART = {"beco_loss": "loss forward"}
OPT_PART = "optimizer step"

SYNC_MESSAGE = "synchroniz"  # torch's "called a synchronizing CUDA operation"


# ----------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """What one run measures, at which sizes (full or smoke)."""
    device: str
    smoke: bool
    size: int
    batches: list[int]
    precisions: list[str]
    iters: int
    warmup: int
    test_iters: int
    test_warmup: int
    peak_tflops: float
    budget_s: float
    sections: list[str]
    # (config file, overrides) per segmenter; the smoke shrinks the same files' nets.
    deeplabv3plus: tuple[str, list[str]] = ("configs/beco_voc.yaml", [])
    deeplabv2: tuple[str, list[str]] = ("configs/beco_voc_deeplabv2.yaml", [])
    segformer: tuple[str, list[str]] = ("configs/beco_voc_segformer_b2.yaml", [])
    reference_batch: int = 4   # the batch of the host-sync, DDP, segmenter and optimiser rows
    amp: str = "bf16"          # the precision of the DDP, segmenter and optimiser rows


def make_plan(args: argparse.Namespace) -> Plan:
    smoke = args.smoke
    on_gpu = args.device.startswith("cuda")
    precisions = ["fp32", "fp16", "bf16"] if on_gpu else ["fp32", "bf16"]  # no GradScaler on the CPU
    amp = "bf16"
    if smoke and not on_gpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # A CPU without bfloat16 instructions (AVX-512 BF16, AMX) emulates bf16 autocast, some
        # ten times slower: the smoke, which only checks the script's paths, would outrun its
        # budget on AVX2 machines. Its fp32 rows take the same paths.
        precisions, amp = ["fp32"], "fp32"
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    plan = Plan(device=args.device, smoke=smoke, size=args.size or (64 if smoke else 512),
                batches=[2] if smoke else [4, 8], precisions=precisions,
                iters=args.iters or (2 if smoke else 10), test_iters=args.iters or (2 if smoke else 10),
                warmup=warmup, test_warmup=warmup,
                peak_tflops=args.peak_tflops, budget_s=args.budget_s,
                sections=[s for s in SECTIONS if not args.only or s in args.only.split(",")],
                reference_batch=2 if smoke else 4, amp=amp)
    if smoke:
        # The same config files as the full run, with CPU-sized nets (as demo*.yaml shrink them).
        plan.deeplabv3plus = ("configs/beco_voc.yaml", ["model.backbone.depth=18"])
        plan.deeplabv2 = ("configs/beco_voc_deeplabv2.yaml", ["model.backbone.depth=18"])
        plan.segformer = ("configs/beco_voc_segformer_b2.yaml",
                          ["model.backbone.variety=b0", "model.decoder.embed_dim=256"])
    return plan


def row_config(plan: Plan, seg: tuple[str, list[str]], precision: str, batch: int,
               extra: Optional[list[str]] = None) -> Config:
    path, overrides = seg
    return load_config(REPO / path, [*overrides, *PRECISIONS[precision], f"data.crop_size={plan.size}",
                                     f"data.batch_size={batch}", *(extra or [])])


# ----------------------------------------------------------------------------- timing helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Time named regions of the step: CUDA events on the GPU, the wall clock on the CPU.

    An event pair brackets the region in stream order, so its interval is the GPU time
    between the region's first and last kernel plus any gap in which the GPU waited for
    the host inside the region (a host sync, Python between launches): the time the
    region holds the GPU's timeline. Events cost a few microseconds each.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.spans: dict[str, list] = defaultdict(list)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.spans[name].append(time.perf_counter() - t0)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)
        return timed

    def totals_s(self) -> dict[str, float]:
        """Seconds per region, summed over its calls."""
        sync(self.device)
        if self.cuda:
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self.spans.items()}
        return {k: float(sum(v)) for k, v in self.spans.items()}

    def calls(self, name: str) -> int:
        return len(self.spans.get(name, ()))


@contextmanager
def instrumented(timer: PartTimer, scaler: torch.amp.GradScaler) -> Iterator[list[str]]:
    """Wrap the non-network functions beco_step calls through engine.beco's globals, and
    ``scaler.step`` (the optimiser step train_step takes), the same objects, only timed; yields
    the names that were missing, restores them after."""
    names = [*OUTSIDE_PARTS, *LOSS_PART]
    saved = {n: getattr(beco, n) for n in names if hasattr(beco, n)}
    try:
        for n, fn in saved.items():
            setattr(beco, n, timer.wrap(n, fn))
        scaler.step = timer.wrap(OPT_PART, scaler.step)  # an instance attribute over the method
        yield [n for n in names if n not in saved]
    finally:
        for n, fn in saved.items():
            setattr(beco, n, fn)
        vars(scaler).pop("step", None)


@contextmanager
def syncs_when_the_step_returns(log: list[warnings.WarningMessage]) -> Iterator[list[int]]:
    """Wrap engine.beco.training_step (train_step calls it through the module) to note how many
    sync warnings ``log`` holds each time it returns: the ones that came while it ran, as
    zero_grad before it synchronises nothing."""
    real = beco.training_step
    counts: list[int] = []

    def noted(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        counts.append(len([w for w in log if SYNC_MESSAGE in str(w.message)]))
        return out
    beco.training_step = noted
    try:
        yield counts
    finally:
        beco.training_step = real


# Extra warm-up iterations a GradScaler row may take to find a loss scale that does not
# overflow; from the initial 2^16 each overflow halves it, so 50 cover any scale in fp16's range.
SCALE_SETTLE_CAP = 50


def scale_dropped(iteration: Callable[[], Any], scaler: Any) -> bool:
    """Run one iteration; True if it lowered the loss scale. GradScaler.update lowers the
    scale exactly when it found inf/NaN gradients, i.e. when ``scaler.step`` skipped the
    optimiser step; otherwise the scale stays, or doubles after a run of good steps."""
    before = scaler.get_scale()
    iteration()
    return scaler.get_scale() < before


def warm_up(iteration: Callable[[], Any], scaler: Any, iters: int,
            cap: int = SCALE_SETTLE_CAP) -> tuple[int, bool]:
    """``iters`` warm-up iterations; with an enabled (fp16) GradScaler, then as many more, at
    most ``cap``, as it takes for one to pass without the scale dropping. Without this the
    first timed iterations of a random net overflow at the initial 2^16 scale and skip the
    optimiser step, which makes them look fast. Returns (extra iterations, whether the scale
    settled)."""
    if not scaler.is_enabled():
        for _ in range(iters):
            iteration()
        return 0, True
    dropped = True  # no iteration seen yet: at least one must pass the check
    for _ in range(iters):
        dropped = scale_dropped(iteration, scaler)
    extra = 0
    while dropped and extra < cap:
        dropped = scale_dropped(iteration, scaler)
        extra += 1
    return extra, not dropped


def random_batch(cfg: Config, batch: int, size: int, device: torch.device, seed: int = 0) -> dict:
    """A normalised random image batch with int64 labels and masks, as the train loader gives
    them; pinned when a GPU will copy it, since the loader pins too (pin_memory on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    c = cfg.data.num_classes
    out = {"image": torch.randn(batch, 3, size, size, generator=g),
           "label": torch.randint(0, c, (batch, size, size), generator=g),
           "mask": torch.randint(0, 2, (batch, size, size), generator=g)}
    if device.type == "cuda":
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


class Rig:
    """Two nets, their optimiser, scaler and autocast for one config (an ``engine.trainer.Run``),
    and one iteration as the training loop runs it (the scheduler's lr update, plain Python,
    left out)."""

    def __init__(self, cfg: Config, device: torch.device, ddp: bool = False):
        configure_backends(cfg)
        set_seed(cfg.train.seed)
        self.cfg, self.device = cfg, device
        self.nets: list[nn.Module] = []
        for _ in range(num_nets(cfg)):
            net = net_layout(build_model(cfg.model, cfg.data.num_classes, pretrained=False).to(device), cfg)
            if ddp:
                # As engine.build.build_nets: SyncBatchNorm on GPUs only (with one process it takes
                # plain BatchNorm's path, so this row measures DDP's hooks and all-reduce).
                if device.type == "cuda":
                    net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
                net = nn.parallel.DistributedDataParallel(
                    net, device_ids=[device.index or 0] if device.type == "cuda" else None)
            self.nets.append(net)
        self.opt = build_optimizer(self.nets, cfg.optim)
        self.scaler = torch.amp.GradScaler(device.type, enabled=uses_grad_scaler(cfg, device))
        self.autocast = make_autocast(cfg, device)
        self.batch = random_batch(cfg, cfg.data.batch_size, cfg.data.crop_size, device)
        # After warm-up and with co-training on: online labels, band and all four loss terms.
        self.epoch = max(cfg.method.warmup_epochs, cfg.method.co_training_start_epoch)
        # One process's Run: the DDP row's group has one rank, whose nets are wrapped above.
        self.run = Run(cfg, DistInfo(0, 1, 0, device), self.nets, self.opt, self.scaler, self.autocast)

    def step(self) -> dict[str, torch.Tensor]:
        """The method's step alone (forward passes and loss), for the FLOP count."""
        return training_step(self.nets, self.batch, self.epoch, self.cfg, self.autocast, self.device)

    def iteration(self) -> float:
        """engine.trainer.train_step on the batch, then, as the loop's agree_on_step, one
        device-to-host transfer for all the loss terms; returns the total loss."""
        losses = train_step(self.run, [self.batch], self.epoch)
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        return values["total"]

    def step_flops(self) -> int:
        """FLOPs of one step (online-label forward of both nets + forward and backward of
        both), as torch's FlopCounterMode counts them: matrix products and convolutions."""
        with FlopCounterMode(display=False) as counter:
            losses = self.step()
            losses["total"].backward()  # unscaled: scaling adds one multiply, no matmul
        self.opt.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())

    def close(self) -> None:
        del self.run, self.nets, self.opt, self.batch
        free_memory(self.device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def settings_of(cfg: Config, plan: Plan, config_path: str, precision: str, **more: Any) -> dict:
    m = to_dict(cfg.model)
    backbone = m["backbone"].get("depth", m["backbone"].get("variety"))
    prec = precision
    if precision == "fp32" and plan.device.startswith("cuda") and cfg.train.allow_tf32:
        prec = "fp32 (TF32 matmul/conv)"
    elif uses_grad_scaler(cfg, torch.device(plan.device)):
        prec = f"{precision} + GradScaler"
    return {"config": config_path, "segmenter": f"{cfg.model.name}-{backbone}", "classes": cfg.data.num_classes,
            "precision": prec, "grad_scaler": uses_grad_scaler(cfg, torch.device(plan.device)),
            "channels_last": cfg.train.channels_last, "batch": cfg.data.batch_size,
            "size": cfg.data.crop_size, "optimizer": f"{cfg.optim.name} ({cfg.optim.implementation})",
            "iters": plan.iters, "warmup": plan.warmup, **more}


# ----------------------------------------------------------------------------- measurements

class Bench:
    """Runs rows under the time budget, keeps their results, writes the JSON and markdown."""

    def __init__(self, plan: Plan, out_dir: Path, argv: list[str], commit: Optional[str]):
        self.plan = plan
        device = torch.device(plan.device)
        if device.type == "cuda" and device.index is None:
            # torch.cuda.set_device and DDP's device_ids need the index.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.out_dir = out_dir
        self.t0 = time.perf_counter()
        self.section_s: dict[str, float] = {}
        self.flops: dict[tuple, int] = {}
        self.flop_errors: dict[tuple, str] = {}  # a key whose count failed is not tried again
        self.data: dict[str, Any] = {"meta": meta(self.device, argv, commit), "plan": asdict(plan),
                                     "sections": {}, "budget": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {msg}", flush=True)

    def row(self, section: str, measured: str, fn: Callable[[], tuple[dict, dict]]) -> dict:
        """Run ``fn`` -> (settings, metrics) unless the budget is spent; a failure is recorded."""
        rows = self.data["sections"].setdefault(section, {"rows": []})["rows"]
        entry: dict[str, Any] = {"measured": measured, "settings": {}, "metrics": {}, "error": None}
        if self.elapsed() > self.plan.budget_s:
            entry["error"] = f"skipped: the time budget of {self.plan.budget_s:.0f} s was spent"
            self.log(f"{section}: {measured}: {entry['error']}")
        else:
            self.log(f"{section}: {measured} ...")
            try:
                entry["settings"], entry["metrics"] = fn()
                self.log(f"{section}: {measured}: {brief(entry['metrics'])}")
            except Exception as e:  # noqa: BLE001 - one row's failure must not stop the others
                entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                traceback.print_exc(file=sys.stderr)
                self.log(f"{section}: {measured}: FAILED {entry['error']}")
                free_memory(self.device)
        rows.append(entry)
        return entry

    def section(self, name: str, fn: Callable[[], None]) -> None:
        if name not in self.plan.sections:
            return
        t = time.perf_counter()
        self.data["sections"].setdefault(name, {"rows": []})
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.data["sections"][name]["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            traceback.print_exc(file=sys.stderr)
        self.section_s[name] = time.perf_counter() - t
        self.write()

    # -- training step rows

    def training(self, config_path: str, cfg: Config, precision: str, ddp: bool = False,
                 count_flops: bool = True, **more: Any) -> tuple[dict, dict]:
        plan, device = self.plan, self.device
        rig = Rig(cfg, device, ddp=ddp)
        try:
            scaled = rig.scaler.is_enabled()
            extra, settled = warm_up(rig.iteration, rig.scaler, plan.warmup)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timer = PartTimer(device)
            skipped = 0
            with instrumented(timer, rig.scaler) as missing:
                # Reading the scale is a host sync, but each iteration already ends with one (the
                # loss terms' transfer), so it costs a few microseconds here, and only fp16 rows.
                scale = rig.scaler.get_scale() if scaled else None
                t0 = time.perf_counter()
                for _ in range(plan.iters):
                    loss = rig.iteration()
                    if scaled:
                        now = rig.scaler.get_scale()
                        if now < scale:
                            skipped += 1
                        scale = now
                sync(device)
                step_s = (time.perf_counter() - t0) / plan.iters
            parts = timer.totals_s()
            metrics: dict[str, Any] = {"it_s": 1 / step_s, "img_s": cfg.data.batch_size / step_s,
                                       "step_ms": step_s * 1e3, "loss": loss}
            if scaled:
                metrics.update(skipped_steps=skipped, warmup_extra_iters=extra, scale_settled=settled,
                               loss_scale=scale)
                if not settled:
                    metrics["scale_warning"] = (f"the loss scale still dropped after {extra} extra warm-up "
                                                f"iterations: skipped steps make this row look fast")
            metrics["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                       if device.type == "cuda" else "n/a (cpu)")
            key = (repr(to_dict(cfg.model)), cfg.data.num_classes, cfg.data.batch_size, cfg.data.crop_size)
            if count_flops and not ddp and key not in self.flops and key not in self.flop_errors:
                # A failing counter costs the row its MFU only, never its measured speed.
                try:
                    self.flops[key] = rig.step_flops()
                except Exception as e:  # noqa: BLE001
                    self.flop_errors[key] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    traceback.print_exc(file=sys.stderr)
            if key in self.flop_errors:
                metrics["flops_error"] = self.flop_errors[key]
            if key in self.flops:
                flops = self.flops[key]
                metrics["tflop_per_step"] = flops / 1e12
                metrics["achieved_tflops"] = flops / step_s / 1e12
                metrics["mfu"] = flops / step_s / (plan.peak_tflops * 1e12)
            per_iter = {k: v / plan.iters for k, v in parts.items()}
            metrics["parts_ms"] = {k: per_iter.get(k, 0.0) * 1e3 for k in [*OUTSIDE_PARTS, *LOSS_PART, OPT_PART]}
            outside = sum(per_iter.get(k, 0.0) for k in OUTSIDE_PARTS)
            metrics["outside_nets_share"] = outside / step_s
            metrics["outside_nets_share_with_loss"] = (outside + per_iter.get("beco_loss", 0.0)) / step_s
            # A part beco_step no longer calls through engine.beco would silently count as 0.
            uncalled = [k for k in [*OUTSIDE_PARTS, *LOSS_PART] if timer.calls(k) != plan.iters]
            if missing or uncalled:
                metrics["parts_warning"] = f"not timed once per iteration: {sorted(set(missing) | set(uncalled))}"
            settings = settings_of(cfg, plan, config_path, precision, ddp=ddp, **more)
            return settings, metrics
        finally:
            rig.close()

    # -- sections

    def train_step(self) -> None:
        plan = self.plan
        for batch in plan.batches:
            for precision in plan.precisions:
                for cl in (False, True):
                    layout = "channels_last" if cl else "NCHW"
                    flags = [f"train.channels_last={str(cl).lower()}"]
                    # The config is built inside the row, so a config error fails that row only.
                    self.row("train_step", f"BECO step, {precision}, {layout}, B={batch}",
                             lambda p=precision, b=batch, f=flags: self.training(
                                 plan.deeplabv3plus[0], row_config(plan, plan.deeplabv3plus, p, b, f), p))

    def host_syncs(self) -> None:
        if self.device.type != "cuda":
            self.data["sections"]["host_syncs"] = {"status": "n/a (cpu)", "rows": []}
            self.log("host_syncs: n/a (cpu)")
            return
        for precision in [p for p in ("fp16", "bf16") if p in self.plan.precisions]:
            self.row("host_syncs", f"host syncs in one iteration, {precision}, B={self.plan.reference_batch}",
                     lambda p=precision: self.syncs(
                         row_config(self.plan, self.plan.deeplabv3plus, p, self.plan.reference_batch), p))

    def syncs(self, cfg: Config, precision: str) -> tuple[dict, dict]:
        rig = Rig(cfg, self.device)
        try:
            # After cuDNN's autotuning syncs, and (fp16) at a settled scale, so the counted
            # iteration takes the optimiser step instead of skipping it.
            extra, settled = warm_up(rig.iteration, rig.scaler, max(self.plan.warmup, 1))
            sync(self.device)
            with warnings.catch_warnings(record=True) as log:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with syncs_when_the_step_returns(log) as counts:
                        rig.iteration()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            in_step = counts[0]
            metrics = summarise_syncs(log, in_step)
            if rig.scaler.is_enabled():
                metrics.update(warmup_extra_iters=extra, scale_settled=settled)
            settings = settings_of(cfg, self.plan, self.plan.deeplabv3plus[0], precision, iters=1)
            return settings, metrics
        finally:
            rig.close()

    def ddp(self) -> None:
        plan = self.plan
        self.row("ddp", f"BECO step under 1-process DDP, {plan.amp}, B={plan.reference_batch}",
                 lambda: self.ddp_row(row_config(plan, plan.deeplabv3plus, plan.amp, plan.reference_batch)))

    def ddp_row(self, cfg: Config) -> tuple[dict, dict]:
        cuda = self.device.type == "cuda"
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=dt.timedelta(seconds=120))
        try:
            settings, metrics = self.training(self.plan.deeplabv3plus[0], cfg, self.plan.amp, ddp=True,
                                              backend=backend, sync_bn=cuda, world_size=1)
        finally:
            dist.destroy_process_group()
        plain = self.find_row("train_step", settings, ddp=False)
        if plain is not None:
            metrics["plain_step_ms"] = plain["step_ms"]
            metrics["ddp_overhead"] = metrics["step_ms"] / plain["step_ms"] - 1
        return settings, metrics

    def find_row(self, section: str, settings: dict, **changes: Any) -> Optional[dict]:
        """The metrics of an earlier row with the same settings but ``changes``."""
        keys = ("config", "segmenter", "precision", "channels_last", "batch", "size", "optimizer")
        for r in self.data["sections"].get(section, {}).get("rows", []):
            s = r["settings"]
            if r["error"] is None and all(s.get(k) == settings.get(k) for k in keys) and \
                    all(s.get(k) == v for k, v in changes.items()):
                return r["metrics"]
        return None

    def test_pass(self) -> None:
        plan = self.plan
        for precision in [p for p in ("fp32", "bf16") if p in plan.precisions]:
            for ms_flip in (False, True):
                mode = "multi-scale + flip" if ms_flip else "single scale"
                flags = [f"test.multi_scale={str(ms_flip).lower()}", f"test.flip={str(ms_flip).lower()}"]
                # data.batch_size only has to pass the config's check (even); the pass runs on batch 1.
                self.row("test_pass", f"test pass, 2 nets averaged, {mode}, {precision}",
                         lambda p=precision, f=flags: self.test_row(
                             row_config(plan, plan.deeplabv3plus, p, plan.reference_batch, f), p))

    def test_row(self, cfg: Config, precision: str) -> tuple[dict, dict]:
        plan, device = self.plan, self.device
        configure_backends(cfg)
        set_seed(cfg.train.seed)
        nets = build_test_nets(cfg, device)
        autocast = make_autocast(cfg, device)
        image = torch.randn(1, 3, plan.size, plan.size, generator=torch.Generator().manual_seed(0)).to(device)

        def once() -> None:
            with autocast():
                predict_maps(nets, image, cfg)
            sync(device)  # test.py fetches each image's map before the next

        try:
            for _ in range(plan.test_warmup):
                once()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(plan.test_iters):
                once()
            per_image = (time.perf_counter() - t0) / plan.test_iters
            scales = (1 + len(cfg.test.scales)) if cfg.test.multi_scale else 1
            forwards = len(nets) * scales * (2 if cfg.test.flip else 1)
            metrics = {"img_s": 1 / per_image, "ms_per_image": per_image * 1e3, "forwards_per_image": forwards,
                       "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
                       if device.type == "cuda" else "n/a (cpu)"}
            settings = settings_of(cfg, plan, plan.deeplabv3plus[0], precision, batch=1, iters=plan.test_iters,
                                   warmup=plan.test_warmup, multi_scale=cfg.test.multi_scale, flip=cfg.test.flip,
                                   scales=list(cfg.test.scales) if cfg.test.multi_scale else [1.0])
            for unused in ("optimizer", "grad_scaler"):  # no training in the test pass
                settings.pop(unused)
            return settings, metrics
        finally:
            nets.clear()  # drops the nets (the closure above still names the list)
            free_memory(device)

    def segmenters(self) -> None:
        plan = self.plan
        for name, seg in (("DeepLabV2", plan.deeplabv2), ("SegFormer", plan.segformer)):
            self.row("segmenters", f"BECO step, {name}, {plan.amp}, B={plan.reference_batch}",
                     lambda seg=seg: self.training(seg[0], row_config(plan, seg, plan.amp, plan.reference_batch),
                                                   plan.amp))

    def optimizers(self) -> None:
        plan = self.plan
        for impl in ("default", "foreach", "fused"):
            flags = [f"optim.implementation={impl}"]
            self.row("optimizers", f"BECO step, optim.implementation={impl}, {plan.amp}, B={plan.reference_batch}",
                     lambda f=flags: self.training(plan.deeplabv3plus[0],
                                                   row_config(plan, plan.deeplabv3plus, plan.amp, plan.reference_batch,
                                                              f),
                                                   plan.amp, count_flops=False))

    # -- output

    def write(self) -> None:
        self.data["budget"] = {"sections_s": dict(self.section_s), "total_s": self.elapsed(),
                               "budget_s": self.plan.budget_s,
                               "skipped_rows": sum(1 for s in self.data["sections"].values() for r in s.get("rows", [])
                                                   if (r["error"] or "").startswith("skipped"))}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_bench.json").write_text(json.dumps(self.data, indent=1) + "\n")
        (self.out_dir / "gpu_bench.md").write_text(markdown(self.data))

    def errors(self) -> list[str]:
        out = []
        for name, s in self.data["sections"].items():
            if s.get("error"):
                out.append(f"{name}: {s['error']}")
            out += [f"{name}: {r['measured']}: {r['error']}" for r in s.get("rows", []) if r["error"]]
        return out


def summarise_syncs(log: list[warnings.WarningMessage], in_step: int) -> dict:
    """Counts and source lines of the sync warnings in ``log``, whose first ``in_step`` sync
    warnings came while ``training_step`` ran; other warnings are ignored."""
    found = [w for w in log if SYNC_MESSAGE in str(w.message)]
    allowed = allowed_sync_line()
    where: dict[tuple, int] = defaultdict(int)
    full: dict[str, str] = {}
    for i, w in enumerate(found):
        short = source_of(w.filename)
        full[short] = w.filename
        where[("training_step" if i < in_step else "rest of iteration", short, w.lineno)] += 1
    allowed_n = sum(n for (part, f, ln), n in where.items() if part == "training_step" and (f, ln) == allowed)

    def code(f: str, ln: int) -> str:
        return linecache.getline(full[f], ln).strip()

    return {"training_step_syncs": in_step, "training_step_allowed": allowed_n,
            "training_step_unexpected": in_step - allowed_n, "iteration_syncs": len(found),
            "allowed_line": f"{allowed[0]}:{allowed[1]}",
            "locations": [{"in": part, "where": f"{f}:{ln}", "count": n, "code": code(f, ln)}
                          for (part, f, ln), n in where.items()]}


def allowed_sync_line() -> tuple[str, int]:
    """engine/mixing.py's one allowed host transfer, the B x C class-presence matrix (found by
    its text, so edits above it do not break the check)."""
    path = REPO / "engine" / "mixing.py"
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if "present" in line and ".cpu()" in line and not line.lstrip().startswith("#"):
            return "engine/mixing.py", i
    return "engine/mixing.py", -1


def source_of(filename: str) -> str:
    """A warning's file, relative to the repo, or to its site-packages (torch/amp/...)."""
    p = Path(filename)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        parts = p.parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in ("site-packages", "dist-packages"):
                return str(Path(*parts[i + 1:]))
        return filename


def brief(m: dict) -> str:
    keys = ("it_s", "img_s", "step_ms", "peak_mem_gib", "mfu", "outside_nets_share", "ms_per_image",
            "training_step_syncs", "iteration_syncs", "ddp_overhead", "skipped_steps", "flops_error")
    return " ".join(f"{k} {fmt(m[k])}" for k in keys if k in m)


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


# ----------------------------------------------------------------------------- metadata and report

def meta(device: torch.device, argv: list[str], commit: Optional[str]) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        dev = {"device_name": name, "gpu_memory_gib": props.total_memory / 2**30,
               "multiprocessors": props.multi_processor_count}
    else:
        dev = {"device_name": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
            "nccl": nccl_version(), "python": platform.python_version(), "device": str(device), **dev,
            "cpu_count": os.cpu_count(), "git_commit": commit or git_commit(),
            "command": " ".join(["benchmarks/gpu_bench.py", *argv])}


def nccl_version() -> str:
    """The NCCL torch was built with, as "2.21.5"; "none" on builds without it (CPU wheels)."""
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a CPU build raises from inside torch, of no fixed type
        return "none"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def git_commit() -> str:
    """HEAD and whether the tree differs from it; 'unknown' where the repo is a copy without .git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows], ""]


def _train_rows(rows: list[dict], extra: Callable[[dict], list[str]] = lambda m: []) -> list[list[str]]:
    out = []
    for r in rows:
        s, m = r["settings"], r["metrics"]
        base = [r["measured"], s.get("segmenter", ""), s.get("precision", ""),
                "channels_last" if s.get("channels_last") else "NCHW", str(s.get("batch", "")), str(s.get("size", "")),
                s.get("optimizer", "")]
        if r["error"]:
            out.append(base + [f"**{r['error']}**"] + [""] * (len(TRAIN_HEADER) - len(base) - 1)
                       + [""] * len(extra({})))
            continue
        parts = m.get("parts_ms", {})
        tflop = f"**count failed:** {m['flops_error']}" if "flops_error" in m else fmt(m.get("tflop_per_step", "-"))
        out.append(base + [fmt(m["it_s"]), fmt(m["img_s"]), fmt(m["step_ms"]), fmt(m["peak_mem_gib"]),
                           tflop, pct(m.get("mfu")), pct(m["outside_nets_share"]),
                           pct(m["outside_nets_share_with_loss"]), fmt(parts.get(OPT_PART, "-")),
                           skipped_cell(m)] + extra(m))
    return out


def skipped_cell(m: dict) -> str:
    """Skipped optimiser steps in the timed iterations (GradScaler rows only), flagged when
    the warm-up never found a scale that stopped overflowing."""
    if "skipped_steps" not in m:
        return "-"
    cell = str(m["skipped_steps"])
    if not m.get("scale_settled", True):
        cell += f" (scale unsettled after {m['warmup_extra_iters']} extra warm-up its)"
    return f"**{cell}**" if m["skipped_steps"] or not m.get("scale_settled", True) else cell


TRAIN_HEADER = ["measured", "segmenter", "precision", "layout", "B", "size", "optimizer", "it/s", "img/s",
                "step ms", "peak GiB", "TFLOP/step", "MFU", "outside nets", "outside + loss fwd", "opt.step ms",
                "skipped steps"]


def markdown(data: dict) -> str:
    m, plan, secs = data["meta"], data["plan"], data["sections"]
    lines = ["# BECO GPU benchmark", "",
             f"{m['date']} · {m['device_name']} · torch {m['torch']} · CUDA {m['cuda']} · cuDNN {m['cudnn']} · "
             f"NCCL {m.get('nccl', '?')} · "
             f"commit {m['git_commit']}", "",
             f"`{m['command']}`{' (smoke sizes)' if plan['smoke'] else ''}: {plan['warmup']} warm-up + "
             f"{plan['iters']} timed iterations per row; MFU against {plan['peak_tflops']:g} TFLOP/s.", ""]
    if "train_step" in secs:
        lines += ["## 1. Training step (2 nets)", "", *_table(TRAIN_HEADER, _train_rows(secs["train_step"]["rows"]))]
        lines += _parts_table(secs["train_step"]["rows"])
    if "host_syncs" in secs:
        lines += ["## 2. Host syncs in one iteration", ""]
        hs = secs["host_syncs"]
        if hs.get("status"):
            lines += [hs["status"], ""]
        rows: list[list[str]] = []
        for r in hs.get("rows", []):
            if r["error"]:
                rows.append([r["measured"], "", f"**{r['error']}**", "", "", ""])
                continue
            mm, st = r["metrics"], r["settings"]
            where = "<br>".join(f"{x['in']}: `{x['where']}` ×{x['count']}"
                                + (f" `{x['code']}`".replace("|", "\\|") if x["code"] else "") for x in mm["locations"])
            rows.append([r["measured"], f"{st.get('segmenter')}, {st.get('precision')}, B={st.get('batch')}, "
                                        f"{st.get('size')}², {st.get('optimizer')}", str(mm["training_step_syncs"]),
                         f"{mm['training_step_allowed']} ({mm['allowed_line']})",
                         str(mm["iteration_syncs"]), where or "none"])
        if rows:
            lines += _table(["measured", "settings", "in training_step", "of which allowed", "whole iteration",
                             "where (Python line that synchronised)"], rows)
    if "ddp" in secs:
        lines += ["## 3. One-process DDP", "",
                  *_table(TRAIN_HEADER + ["plain step ms", "DDP overhead"],
                          _train_rows(secs["ddp"]["rows"], lambda mm: [fmt(mm.get("plain_step_ms", "-")),
                                                                      pct(mm.get("ddp_overhead"))]))]
    if "test_pass" in secs:
        rows = []
        for r in secs["test_pass"]["rows"]:
            s, mm = r["settings"], r["metrics"]
            if r["error"]:
                rows.append([r["measured"], "", "", "", f"**{r['error']}**", "", "", ""])
                continue
            rows.append([r["measured"], s["segmenter"], s["precision"], str(s["size"]),
                         ", ".join(f"{x:g}" for x in s["scales"]) + (" + flip" if s["flip"] else ""),
                         fmt(mm["img_s"]), fmt(mm["ms_per_image"]), str(mm["forwards_per_image"]),
                         fmt(mm["peak_mem_gib"])])
        lines += ["## 4. Test pass (batch 1)", "",
                  *_table(["measured", "segmenter", "precision", "size", "scales", "img/s", "ms/image",
                           "net forwards/image", "peak GiB"], rows)]
    if "segmenters" in secs:
        lines += ["## 5. Other segmenters", "", *_table(TRAIN_HEADER, _train_rows(secs["segmenters"]["rows"]))]
    if "optimizers" in secs:
        lines += ["## 6. Optimiser implementations", "", *_table(TRAIN_HEADER, _train_rows(secs["optimizers"]["rows"]))]
    for name, s in secs.items():
        if s.get("error"):
            lines += [f"**Section {name} failed:** {s['error']}", ""]
    b = data["budget"]
    lines += ["## Time", "", *_table(["section", "s"], [[k, f"{v:.1f}"] for k, v in b["sections_s"].items()]
                                      + [["total", f"{b['total_s']:.1f}"], ["budget", f"{b['budget_s']:.0f}"]])]
    lines += ["## How it is measured", "", *METHOD_NOTES, ""]
    return "\n".join(lines)


def _parts_table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["error"]:
            continue
        p = r["metrics"]["parts_ms"]
        out.append([r["measured"], *[fmt(p.get(k, 0.0)) for k in [*OUTSIDE_PARTS, *LOSS_PART]],
                    fmt(r["metrics"]["step_ms"]), r["metrics"].get("parts_warning", "")])
    if not out:
        return []
    return ["Non-network parts of the step, ms per iteration:", "",
            *_table(["measured", *OUTSIDE_PARTS.values(), *LOSS_PART.values(), "whole step", "note"], out)]


METHOD_NOTES = [
    "- **Iteration**: the training loop's `engine.trainer.train_step`: `zero_grad`, `engine.beco.training_step` "
    "at an epoch past warm-up and co-training start (online labels, band and all four loss terms on), scaled "
    "backward, `scaler.step`, `scaler.update`; then the loss terms fetched in one transfer (so each iteration ends with a host sync, "
    "as in training). Random batch pinned on the host, copied in the step; no data loading, no scheduler.",
    "- **it/s, img/s, step ms**: wall clock over the timed iterations after the warm-up, synchronised at the end.",
    "- **peak GiB**: `torch.cuda.max_memory_allocated` over the timed iterations (weights, gradients, "
    "momentum and activations of both nets).",
    "- **MFU**: FLOPs of one step / step time / peak. The FLOPs are counted once per segmenter, batch and size "
    "with `torch.utils.flop_counter.FlopCounterMode` around `training_step` + backward (the online-label forward "
    "of both nets in eval mode, then forward and backward of both): matrix products and convolutions only, "
    "independent of precision and layout. The peak is `--peak-tflops` (989 = dense bf16 of H100/H200 SXM) "
    "for every row: fp32 rows (which run TF32 tensor cores, train.allow_tf32) are against the bf16 peak too, "
    "so their MFU reads low by design (TF32's own dense peak is half of it). On the CPU the number is meaningless.",
    "- **outside nets**: the non-network parts of `beco_step`, `confident_labels` (online labels from the "
    "averaged logits), `mix_batch` (boundary-enhanced mixing, with its B×C host transfer) and `augment` "
    "(strong augmentation), each timed where `beco_step` calls it, by wrapping the `engine.beco` global with a "
    "pair of CUDA events (wall clock on the CPU), in the timed iterations themselves. An event pair's interval "
    "is the time the part holds the GPU's timeline: its kernels plus any wait for the host inside it (the "
    "host sync of the class-presence matrix, Python between launches). Share = their sum / step time. "
    "*outside + loss fwd* adds the loss's forward (`beco_loss`); the loss's backward, the batch's copy to the "
    "device and the optimiser are in neither share.",
    "- **opt.step ms**: `scaler.step(optimizer)` timed the same way (with fp16 it includes the gradient unscale "
    "and its inf check, one host sync).",
    "- **skipped steps** (fp16 + GradScaler rows): a random net's gradients overflow fp16 at the initial loss "
    f"scale of 2^16, and `scaler.step` then skips the optimiser step, which makes an iteration fast. After the "
    f"warm-up iterations such a row runs more (at most {SCALE_SETTLE_CAP}, `warmup_extra_iters`) until one passes "
    "without the scale dropping (`scaler.update` lowers it exactly when it skipped the step), and counts the timed "
    "iterations whose step was skipped; a bold count, or a scale that never settled, marks a row that times "
    "skipped steps. The host syncs row warms up the same way. `-`: no GradScaler.",
    "- **TFLOP/step count failed**: the FLOP counter raised; the row keeps its measured speed and records "
    "`flops_error` instead of TFLOP/step and MFU.",
    "- **host syncs**: one iteration after the warm-up with `torch.cuda.set_sync_debug_mode('warn')` inside "
    "`warnings.catch_warnings(record=True)` (filter 'always'): warnings counted while `training_step` runs, "
    "and for the whole iteration; the one allowed inside the step is the class-presence `.cpu()` in "
    "engine/mixing.py. Each location is the Python line that made the synchronising call.",
    "- **DDP**: `init_process_group` (NCCL; gloo on the CPU) on a free localhost port, world size 1, nets "
    "through `nn.SyncBatchNorm.convert_sync_batchnorm` (GPU) and `DistributedDataParallel`, as engine.build.build_nets; "
    "with one process SyncBatchNorm runs plain BatchNorm, so the overhead is DDP's hooks, buckets and all-reduce.",
    "- **test pass**: `engine.inference.predict_maps` (both nets averaged by `engine.evaluate.average_outputs`; "
    "multi-scale adds every `test.scales` resize to the base pass, flip doubles each) on one random image, "
    "synchronised per image; no loading, no saving, NCHW as test.py runs it.",
    "- **budget**: a row that would start after `--budget-s` is recorded as skipped; rows are not cut short.",
]


# ----------------------------------------------------------------------------- entry point

def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The options; gpu_smoke.py takes them too, since gpu.sh passes the same arguments to both."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=add_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path, measures nothing useful")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="results folder when $OUT is not set (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak for MFU, TFLOP/s (default 989: dense bf16, H100/H200 SXM)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per row (default 3; smoke 1)")
    p.add_argument("--size", type=int, default=None, help="square crop / test size (default 512; smoke 64)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no row after this many seconds (default 400, so the run ends within 8 "
                        "minutes; smoke 120; gpu.sh gives what the checks left of 440)")
    p.add_argument("--only", default="", help=f"comma-separated sections out of {','.join(SECTIONS)}")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; smoke 1, which a busy 2-core host "
                        "cannot slow down by descheduling one of the threads every parallel op waits for)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 120.0 if args.smoke else 400.0
    unknown = set(filter(None, args.only.split(","))) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; expected some of {list(SECTIONS)}")
    return args


def results_dir(out: str) -> Path:
    """$OUT when it is set (a lent device's machine returns what is written there), else ``out``."""
    env_out = os.environ.get("OUT")
    if env_out and Path(out) not in (DEFAULT_OUT, Path(env_out)):
        print(f"$OUT is set: writing to {env_out}, not to --out {out}", flush=True)
    return Path(env_out or out)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA device here; run with --device cpu", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    plan = make_plan(args)
    out_dir = results_dir(args.out)
    bench = Bench(plan, out_dir, argv, args.commit)
    m = bench.data["meta"]
    bench.log(f"{m['device_name']} | torch {m['torch']} CUDA {m['cuda']} | commit {m['git_commit']} | "
              f"size {plan.size} batches {plan.batches} | {plan.warmup}+{plan.iters} iterations | "
              f"budget {plan.budget_s:.0f} s | results -> {out_dir}")
    for name in SECTIONS:
        bench.section(name, getattr(bench, name))
    bench.write()
    print("time budget:", ", ".join(f"{k} {v:.1f} s" for k, v in bench.section_s.items()),
          f"| total {bench.elapsed():.1f} s of {plan.budget_s:.0f} s", flush=True)
    errors = bench.errors()
    for e in errors:
        print(f"error: {e}", file=sys.stderr, flush=True)
    print(f"wrote {out_dir / 'gpu_bench.json'} and {out_dir / 'gpu_bench.md'}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

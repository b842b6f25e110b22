"""Every CPU benchmark of the repository, one table: benchmarks/results/<machine>.md and .json.

    python benchmarks/run_all.py                          # CPU sizes, under 10 minutes on 2 cores
    python benchmarks/run_all.py --smoke --out /tmp/b     # tiny sizes (the test suite's run, ~1 minute)
    python benchmarks/run_all.py --only train_step crf    # some benchmarks only
    python benchmarks/run_all.py --crf-images 16 --machine laptop

Each benchmark runs as its own subprocess (a crash becomes a row holding its error, and
thread settings stay in that process); its printed figures are parsed into rows, each
naming the exact command that measured it, so one row can be rerun alone. The sizes of
the full run and of ``--smoke`` are the ``SIZES`` table below; every entry is also a flag
(``--train-iters 10``), whose value wins in either mode. benchmarks/README.md explains
every figure. The ``make demo`` row is read from the demo's timings.json, never run here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Sizes of each benchmark: (full run, --smoke). The full column fits 10 minutes on 2 cores.
SIZES: dict[str, tuple[object, object]] = {
    # benchmarks/train_step.py: square crop, batch, timed and warm-up iterations
    "train_size": (128, 64),
    "train_batch": (4, 2),
    "train_iters": (10, 1),
    "train_warmup": (2, 1),
    # benchmarks/step_overhead.py: the issue's B = 4, 512 x 512, 2 threads
    "overhead_batch": (4, 2),
    "overhead_size": (512, 64),
    "overhead_threads": (2, 2),
    "overhead_repeats": (15, 1),
    # benchmarks/data_pipeline.py: demo.yaml's set, then VOC-sized images and crops
    "data_workers": ("0 1 2", "0 1 2"),
    "data_train": (200, 8),
    "data_batches": (50, 2),
    "data_voc_image": ("375 500", "64 80"),
    "data_voc_crop": (512, 48),
    "data_voc_batch": (4, 2),
    "data_voc_train": (60, 6),
    "data_voc_batches": (14, 2),
    # benchmarks/eval_speed.py: val images, batch sizes
    "eval_images": (32, 2),
    "eval_batch": ("1 8", "1 2"),
    # benchmarks/crf.py: images of VOC's typical size (chunks of 4 ids per worker: >= 8 keeps 2 busy)
    "crf_images": (16, 2),
    "crf_image": ("375 500", "48 64"),
    # benchmarks/random_walk.py: stride-4 map sizes (the dense path is O(n^2) memory, O(n^3) time)
    "rw_sizes": ("24x32 32x48 40x56", "8x12"),
    # benchmarks/coco_eval.py: images (>= 3, the generator's minimum), size, map side, full-CRF images
    "coco_images": (3, 3),
    "coco_image": ("480 640", "48 64"),
    "coco_map": (128, 16),
    "coco_full_crf": (1, 1),
}


@dataclass
class Row:
    id: str                      # stable key: "<benchmark>.<variant>"
    section: str
    what: str
    command: str                 # what a reader runs (from the repository root) to measure this row again
    figure: str = ""             # the human-readable figure
    metrics: dict = field(default_factory=dict)
    seconds: float | None = None  # wall time of the benchmark process that measured it
    error: str | None = None


Parser = Callable[[str], dict[str, tuple[str, dict]]]  # stdout -> row id suffix -> (figure, metrics)


@dataclass
class Bench:
    name: str                    # for --only
    section: str
    argv: list[str]              # arguments of the python interpreter
    command: str                 # shown in the rows
    rows: dict[str, str]         # row id suffix -> what it measures
    parse: Parser


# ----------------------------------------------------------------------------- parsers

def json_tail(stdout: str) -> dict:
    """The JSON object on the last line that holds one (what ``--json`` scripts print last)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


_TRAIN = re.compile(r"device (?P<device>\S+) (?P<method>\S+) (?P<model>\S+) \((?P<params>[\d,]+) parameters per net\) "
                    r"size (?P<size>\d+) batch (?P<batch>\d+) amp (?P<amp>\S+): (?P<it_s>[\d.]+) it/s "
                    r"(?P<img_s>[\d.]+) img/s(?: peak_mem_gib (?P<mem>[\d.]+))?")


def parse_train_step(stdout: str) -> dict[str, tuple[str, dict]]:
    """benchmarks/train_step.py's one line."""
    m = None
    for line in stdout.splitlines():
        m = _TRAIN.search(line) or m
    if m is None:
        raise ValueError("no 'it/s ... img/s' line in the output")
    metrics = {"it_s": float(m["it_s"]), "img_s": float(m["img_s"]),
               "params_per_net": int(m["params"].replace(",", "")),
               "method": m["method"], "model": m["model"], "size": int(m["size"]), "batch": int(m["batch"])}
    if m["mem"]:
        metrics["peak_mem_gib"] = float(m["mem"])
    figure = (f"{metrics['it_s']:.2f} it/s, {metrics['img_s']:.1f} img/s ({m['method']} {m['model']}, "
              f"{metrics['params_per_net']:,} parameters per net)")
    return {"": (figure, metrics)}


_OVERHEAD_PARTS = {"online": "online labels", "mixing": "mixing", "strong": "strong augmentation", "total": "total"}
_OVERHEAD_LINE = re.compile(r"^\s+(?P<name>\S.*?)\s+(?P<s>[\d.]+) s$")


def step_overhead_parts(stdout: str) -> dict[str, float]:
    """Seconds per part of benchmarks/step_overhead.py: from the JSON of its ``main``'s return
    value when the output has it (run_all's call), else from its printed ``  name  0.031 s`` lines."""
    try:
        raw = json_tail(stdout)
    except ValueError:
        raw = {m["name"]: float(m["s"]) for m in map(_OVERHEAD_LINE.match, stdout.splitlines()) if m}
    parts = {}
    for key, value in raw.items():
        first = key.split()[0].lower()
        short = {"online": "online", "boundary-enhanced": "mixing", "strong": "strong", "total": "total"}.get(first)
        if short:
            parts[short] = float(value)
    missing = [k for k in _OVERHEAD_PARTS if k not in parts]
    if missing:
        raise ValueError(f"parts missing from the output: {', '.join(missing)}")
    return parts


def parse_step_overhead(stdout: str) -> dict[str, tuple[str, dict]]:
    p = step_overhead_parts(stdout)
    figure = (f"total {p['total']:.3f} s/step; alone: online labels {p['online']:.3f} s, mixing {p['mixing']:.3f} s, "
              f"strong augmentation {p['strong']:.3f} s (target <= 0.08 s, reference 0.16 s)")
    return {"": (figure, {f"{k}_s": v for k, v in p.items()})}


_CRF = re.compile(r"^(?P<variant>full|pruned p>=\S+)\s+(?P<jobs>\d+)\s+(?P<img_s>[\d.]+)\s+(?P<core_s>[\d.]+)\s+"
                  r"(?P<labels>[\d.]+)\s+(?P<same>.+)$")


def parse_crf(stdout: str, jobs_all: int) -> dict[str, tuple[str, dict]]:
    """benchmarks/crf.py's table: rows ``full`` / ``pruned`` x 1 core / ``jobs_all`` cores."""
    out = {}
    for line in stdout.splitlines():
        m = _CRF.match(line.strip())
        if not m:
            continue
        kind = "full" if m["variant"] == "full" else "pruned"
        jobs = int(m["jobs"])
        metrics = {"jobs": jobs, "img_s": float(m["img_s"]), "wall_s_per_image": 1 / float(m["img_s"]),
                   "core_s_per_image": float(m["core_s"]), "labels": float(m["labels"]), "same_as_full": m["same"]}
        figure = (f"{metrics['wall_s_per_image']:.2f} s/image wall ({metrics['img_s']:.2f} img/s, "
                  f"{metrics['core_s_per_image']:.2f} core-s/image), {metrics['labels']:.1f} labels, "
                  f"same as full: {m['same']}")
        for suffix, want in (("1core", 1), ("allcores", jobs_all)):
            if jobs == want:
                out[f"{kind}.{suffix}"] = (figure, metrics)
    return out


_RW = re.compile(r"^(?P<h>\d+)x(?P<w>\d+): dense (?P<dense>[\d.]+) s, sparse (?P<sparse>[\d.]+) s, "
                 r"speedup (?P<speedup>[\d.]+)x, max \|score diff\| (?P<diff>[\d.e+-]+), labels equal (?P<equal>\w+)")


def parse_random_walk(stdout: str) -> dict[str, tuple[str, dict]]:
    """benchmarks/random_walk.py's per-size result lines."""
    out = {}
    for line in stdout.splitlines():
        m = _RW.match(line.strip())
        if not m:
            continue
        metrics = {"dense_s": float(m["dense"]), "sparse_s": float(m["sparse"]), "speedup": float(m["speedup"]),
                   "max_abs_diff": float(m["diff"]), "labels_equal": m["equal"] == "True"}
        figure = (f"dense {metrics['dense_s']:.3f} s, sparse {metrics['sparse_s']:.4f} s ({metrics['speedup']:.1f}x), "
                  f"max |score diff| {m['diff']}, labels equal {m['equal']}")
        out[f"{m['h']}x{m['w']}"] = (figure, metrics)
    return out


_COCO_PATH = re.compile(r"^(?P<path>\S.*?)\s{2,}(?P<s>[\d.]+)\s+(?P<h1>[\d.]+)\s+(?P<h16>[\d.]+)$")
_COCO_DISK = re.compile(r"^(?P<fmt>(?:dense|compact) float(?:16|32))\s+(?P<mb>[\d.]+)\s+(?P<gb>[\d.]+)$")
COCO_ROWS = {  # row -> (what, the coco_eval paths it shows)
    "save": ("writing one score map", ("save: dense float32", "save: compact float16")),
    "no_crf": ("test.py without CRF (read, upsample, softmax, arg-max)",
               ("test.py no CRF: dense float32", "test.py no CRF: compact float16")),
    "crf_pruned": ("test.py with the pruned CRF", ("test.py CRF pruned: dense float32",
                                                   "test.py CRF pruned: compact float16")),
    "crf_full": ("test.py with the CRF over all 81 labels", ("test.py CRF over all 81 labels: dense float32",)),
}


def parse_coco_eval(stdout: str) -> dict[str, tuple[str, dict]]:
    """benchmarks/coco_eval.py's two tables (s/image per path, MB/image per map format)."""
    paths, disk = {}, {}
    for line in stdout.splitlines():
        line = line.strip()
        m = _COCO_DISK.match(line)
        if m:
            disk[m["fmt"]] = float(m["mb"])
            continue
        m = _COCO_PATH.match(line)
        if m:
            paths[m["path"]] = float(m["s"])
    out = {}
    for key, (_, names) in COCO_ROWS.items():
        found = {n: paths[n] for n in names if n in paths}
        if found:
            out[key] = (", ".join(f"{n.split(': ')[-1]} {s:.3f} s/image" for n, s in found.items()),
                        {f"{n.split(': ')[-1]}_s_per_image": s for n, s in found.items()})
    if disk:
        out["disk"] = (", ".join(f"{k} {v:.3f} MB/image" for k, v in disk.items()),
                       {f"{k}_mb_per_image": v for k, v in disk.items()})
    return out


def parse_data_pipeline(stdout: str) -> dict[str, tuple[str, dict]]:
    out = {}
    for r in json_tail(stdout)["rows"]:
        figure = (f"{r['img_s']:.1f} img/s, {r['img_s_per_worker']:.1f} img/s per worker "
                  f"(first batch after {r['first_batch_s']:.2f} s)")
        out[f"w{r['workers']}"] = (figure, r)
    return out


def parse_eval_speed(stdout: str) -> dict[str, tuple[str, dict]]:
    out = {}
    for r in json_tail(stdout)["rows"]:
        key = "loading" if r["variant"] == "loading" else f"{r['variant']}.b{r['batch']}"
        out[key] = (f"{r['img_s']:.1f} img/s ({1 / r['img_s']:.4f} s/image)", r)
    return out


# ----------------------------------------------------------------------------- the plan

def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def command_text(argv: list[str], env: str = "") -> str:
    return (env + " " if env else "") + "python " + " ".join(shlex.quote(a) for a in argv)


# The -c program that runs benchmarks/step_overhead.py's main(argv) and prints its return value
# as JSON; its printed lines are those of `python benchmarks/step_overhead.py argv`.
_CALL_OVERHEAD = ("import json, sys; from benchmarks.step_overhead import main; "
                  "print(json.dumps(main(sys.argv[1:])))")


def plan(sz: dict, jobs_all: int) -> list[Bench]:
    """The benchmarks to run, at the sizes ``sz`` (SIZES' keys)."""
    def split(key: str) -> list[str]:
        return str(sz[key]).split()

    benches = []
    train = ["--size", str(sz["train_size"]), "--batch", str(sz["train_batch"]), "--iters", str(sz["train_iters"]),
             "--warmup", str(sz["train_warmup"])]
    for key, what, config in (
            ("deeplabv3plus", "BECO train step, DeepLabV3+ ResNet-18 (2 nets)", ["--config", "configs/demo.yaml"]),
            ("deeplabv2", "BECO train step, DeepLabV2 ResNet-18 (2 nets)",
             ["--config", "configs/demo.yaml", "model.name=deeplabv2", "model.backbone.depth=18"]),
            ("segformer", "BECO train step, SegFormer MiT-B0 (2 nets)", ["--config", "configs/demo_segformer.yaml"]),
            ("baseline", "CE baseline train step, DeepLabV3+ ResNet-18 (1 net)",
             ["--config", "configs/demo_baseline.yaml"])):
        argv = ["benchmarks/train_step.py", *config, *train]
        benches.append(Bench(f"train_step.{key}", "Training step (compute only, synthetic batches)", argv,
                             command_text(argv), {"": what}, parse_train_step))
    overhead = ["--batch", str(sz["overhead_batch"]), "--size", str(sz["overhead_size"]),
                "--threads", str(sz["overhead_threads"]), "--repeats", str(sz["overhead_repeats"])]
    for key, extra, what in (("photo", [], "photo-like images"), ("noise", ["--noise-images"], "pure-noise images")):
        args = overhead + extra
        benches.append(Bench(f"step_overhead.{key}", "Step overhead (non-network work of one BECO step)",
                             ["-c", _CALL_OVERHEAD, *args], command_text(["benchmarks/step_overhead.py", *args]),
                             {"": f"online labels + mixing + strong augmentation, {what}"}, parse_step_overhead))
    workers = split("data_workers")
    data_rows = {f"w{w}": f"num_workers {w}" for w in workers}
    argv = ["benchmarks/data_pipeline.py", "--workers", *workers, "--train", str(sz["data_train"]),
            "--batches", str(sz["data_batches"])]
    benches.append(Bench("data_pipeline.demo", "Data pipeline (main.py's training loader, no network)",
                         [*argv, "--json"], command_text(argv),
                         {k: f"demo.yaml set, {v}" for k, v in data_rows.items()}, parse_data_pipeline))
    argv = ["benchmarks/data_pipeline.py", f"data.crop_size={sz['data_voc_crop']}",
            f"data.batch_size={sz['data_voc_batch']}", "--size", *split("data_voc_image"), "--workers", *workers,
            "--train", str(sz["data_voc_train"]), "--batches", str(sz["data_voc_batches"])]
    benches.append(Bench("data_pipeline.voc", "Data pipeline (main.py's training loader, no network)",
                         [*argv, "--json"], command_text(argv),
                         {k: f"VOC-sized images and crops, {v}" for k, v in data_rows.items()}, parse_data_pipeline))
    batches = split("eval_batch")
    argv = ["benchmarks/eval_speed.py", "--images", str(sz["eval_images"]), "--batch", *batches]
    eval_rows = {"loading": f"EvalSet reading + resizing, batch {batches[0]}"}
    for b in batches:
        eval_rows[f"single.b{b}"] = f"2 nets averaged, single scale, batch {b}"
        eval_rows[f"msc_flip.b{b}"] = f"2 nets averaged, multi-scale + flip, batch {b}"
        eval_rows[f"test_loop.b{b}"] = f"run_test's per-batch body (single scale, save maps, metrics), batch {b}"
    benches.append(Bench("eval_speed", "Evaluation (main.py --test's pass, demo.yaml, CPU)", [*argv, "--json"],
                         command_text(argv), eval_rows, parse_eval_speed))
    argv = ["benchmarks/crf.py", "--images", str(sz["crf_images"]), "--size", *split("crf_image"),
            "--jobs", "1", str(jobs_all)]
    benches.append(Bench("crf", "Dense CRF (test.py --crf)", argv, command_text(argv),
                         {"full.1core": "full CRF, 1 core", "full.allcores": f"full CRF, {jobs_all} cores",
                          "pruned.1core": "pruned CRF (default), 1 core",
                          "pruned.allcores": f"pruned CRF (default), {jobs_all} cores"},
                         lambda out: parse_crf(out, jobs_all)))
    sizes = split("rw_sizes")
    argv = ["benchmarks/random_walk.py", "--sizes", *sizes]
    benches.append(Bench("random_walk", "Random walk (first stage, dense vs sparse)", argv,
                         command_text(argv),
                         {s: f"stride-4 map {s}" for s in sizes}, parse_random_walk))
    argv = ["benchmarks/coco_eval.py", "--images", str(sz["coco_images"]), "--size", *split("coco_image"),
            "--map-size", str(sz["coco_map"]), "--full-crf", str(sz["coco_full_crf"])]
    coco_rows = {k: f"{what}, per image on one core" for k, (what, _) in COCO_ROWS.items()}
    coco_rows["disk"] = "score map on disk"
    benches.append(Bench("coco_eval", "COCO evaluation paths (81 classes)", argv, command_text(argv),
                         coco_rows, parse_coco_eval))
    return benches


def run_bench(bench: Bench, timeout: float) -> list[Row]:
    """Run one benchmark process; its rows, each an error row when the process or the parser failed."""
    env = dict(os.environ)
    t0 = time.perf_counter()
    error, parsed = None, {}
    try:
        proc = subprocess.run([sys.executable, *bench.argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["(no error output)"]
            error = f"exit {proc.returncode}: {tail[0].strip()[:300]}"
        else:
            parsed = bench.parse(proc.stdout)
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    except (ValueError, KeyError, TypeError) as e:
        error = f"could not parse the output: {e}"
    seconds = time.perf_counter() - t0
    rows = []
    for suffix, what in bench.rows.items():
        row = Row(id=bench.name + (f".{suffix}" if suffix else ""), section=bench.section, what=what,
                  command=bench.command, seconds=round(seconds, 1))
        if error:
            row.error = error
        elif suffix not in parsed:
            row.error = "not in the benchmark's output"
        else:
            row.figure, row.metrics = parsed[suffix]
        rows.append(row)
    return rows


def demo_rows() -> list[Row]:
    """``make demo`` stage times from each demo's <out>/timings.json (tools/demo.py's DEMOS), never run here."""
    # Here, not at the top: run_all only starts the benchmarks, and needs the demo's table for this one row.
    from tools.demo import DEMOS, STAGES
    rows = []
    for dataset, (*_, out) in DEMOS.items():
        command = "make demo" if dataset == "voc" else f'make demo DEMO_ARGS="--dataset {dataset}"'
        path = REPO / out / "timings.json"
        row = Row(id=f"demo.{dataset}", section="make demo (stage wall times)",
                  what=f"{dataset} demo, read from {out}/timings.json", command=command)
        if not path.is_file():
            row.error = f"not run (run `{command}` first)"
        else:
            times = json.loads(path.read_text())
            stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            total = sum(float(times.get(s, 0.0)) for s in STAGES)
            row.figure = (", ".join(f"{s} {float(times[s]):.1f} s" for s in STAGES if s in times)
                          + f"; total {total:.1f} s (file of {stamp})")
            row.metrics = {**{f"{s}_s": float(times[s]) for s in STAGES if s in times}, "total_s": total}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the report

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_slug(model: str, n: int) -> str:
    """``cpu<cores>-<short model>``: 'Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz', 2 -> cpu2-intel-xeon-gold-6230."""
    short = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", model.lower())
    short = "-".join(re.findall(r"[a-z0-9]+", short)[:4]) or "unknown"
    return f"cpu{n}-{short}"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(machine: str, smoke: bool) -> dict:
    try:
        import torch  # its __version__ names the build (+cu130, +cpu), the package metadata does not
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return {"machine": machine, "cpu": cpu_model(), "cores": cores(), "logical_cpus": os.cpu_count(),
            "torch": torch_version, "python": platform.python_version(), "commit": git_commit(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "smoke (tiny sizes: checks the suite, the figures mean nothing)" if smoke else "full (CPU sizes)"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, head: dict, rows: list[Row], wall: float) -> None:
    lines = [f"# Benchmarks: {head['machine']}", "",
             f"- CPU: {head['cpu']}, {head['cores']} cores available ({head['logical_cpus']} logical CPUs)",
             f"- torch {head['torch']}, Python {head['python']}",
             f"- commit {head['commit']}", f"- date {head['date']}", f"- mode: {head['mode']}",
             f"- `python benchmarks/run_all.py` took {wall:.0f} s; what each figure means: benchmarks/README.md", ""]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += ["", f"## {section}", "", "| row | what | figure | command |", "|---|---|---|---|"]
        figure = row.figure if row.error is None else f"**{row.error}**"
        lines.append(f"| {row.id} | {_cell(row.what)} | {_cell(figure)} | `{_cell(row.command)}` |")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every row, about a minute")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of <machine>.md and .json (default: %(default)s)")
    p.add_argument("--machine", default=None,
                   help="name of the results (default: cpu<cores>-<short CPU model>, '-smoke' added with --smoke)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="benchmarks whose name starts with one of these (train_step, step_overhead, data_pipeline, "
                        "eval_speed, crf, random_walk, coco_eval, demo)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one benchmark process may take (default: 300)")
    sizes = p.add_argument_group("sizes (default: the full run's / --smoke's)")
    for key, (full, smoke) in SIZES.items():
        sizes.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=f"{full} / {smoke}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sz = {k: (getattr(args, k) if getattr(args, k) is not None else v[1 if args.smoke else 0])
          for k, v in SIZES.items()}
    n = cores()
    machine = args.machine or machine_slug(cpu_model(), n) + ("-smoke" if args.smoke else "")
    head = header(machine, args.smoke)

    def wanted(name: str) -> bool:
        return args.only is None or any(name.startswith(o) for o in args.only)

    benches = [b for b in plan(sz, n) if wanted(b.name)]
    t_start = time.perf_counter()
    say = lambda msg: print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    say(f"{machine}: {len(benches)} benchmark processes ({'smoke' if args.smoke else 'full'} sizes), "
        f"{head['cpu']}, {n} cores, torch {head['torch']}")
    rows: list[Row] = []
    for k, bench in enumerate(benches, 1):
        say(f"{k}/{len(benches)} {bench.name}: {bench.command}")
        new = run_bench(bench, args.timeout)
        for r in new:
            print(f"    {r.id}: {r.error or r.figure}", flush=True)
        print(f"    ({new[0].seconds:.1f} s)", flush=True)
        rows += new
    if wanted("demo"):
        try:
            rows += demo_rows()
        except Exception as e:  # noqa: BLE001 - a broken tools/demo.py import must not lose the other rows
            rows.append(Row(id="demo.voc", section="make demo (stage wall times)", what="voc demo",
                            command="make demo", error=f"could not read the demo's timings: {e}"))
        for r in rows[-2:]:
            if r.id.startswith("demo."):
                print(f"    {r.id}: {r.error or r.figure}", flush=True)
    wall = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"{machine}.md", args.out / f"{machine}.json"
    write_markdown(md, head, rows, wall)
    js.write_text(json.dumps({**head, "wall_s": round(wall, 1), "sizes": sz,
                              "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    failed = [r.id for r in rows if r.error and not r.id.startswith("demo.")]
    note = f"; {len(failed)} rows failed: {', '.join(failed)}" if failed else ""
    say(f"wrote {md} and {js} in {wall:.0f} s{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

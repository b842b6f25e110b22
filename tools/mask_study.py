"""When does BECO help? BECO's gain over plain cross entropy on a map of the confidence mask's quality.

    python tools/mask_study.py                         # configs/mask_study.yaml, ~2 h on 2 cores
    python tools/mask_study.py --part 0/2 & python tools/mask_study.py --part 1/2   # the two cores
    python tools/mask_study.py --report-only           # the table and map of what has run

Steps, each skipped when its output is there (a killed study resumes):
1. the synthetic set and the first stage's own pseudo-labels and masks on it (tools/noise_study.py's
   steps 1 and 2: demo.yaml's generator, run_sample.py with the demo's options);
2. for every grid cell and mask shape, masks of that quality on the first stage's labels
   (datasets/synthetic/mask_control.py), under <out>/masks/<cell>; every cell is checked
   reachable before any is written;
3. the methods trained through main.py (tools/noise_study.py's ``train``) with every seed: the
   CE baseline once per seed (it reads no mask), the others on every cell;
4. the table (<out>/mask_study.md, .json) and the heat map of BECO − baseline (<out>/gain_map.png:
   mean paired by seed; cells whose 95 % t-interval excludes 0 marked), with the first stage's
   own masks placed at their measured figures, and so are the first stage's own masks on each of
   ``other_first_stages`` (run here, e.g. on the COCO demo tree; nothing is trained on them) and
   every one of ``points`` (figures given, or read from tools/import_labels.py's label_quality.json).
A mask folder or runs made with other settings are refused (utils/provenance.py), never mixed in;
--overwrite makes them again.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tools import demo, noise_study  # noqa: E402  (the data, first-stage and training steps are theirs)
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR, save_mask
from datasets.label_import import QUALITY_JSON
from datasets.synthetic.mask_control import GENERATOR_VERSION, SHAPES, TARGETS, controlled_masks, kept_counts, mask_figures, pool_sizes
from engine.config import load_config
from utils import provenance
from utils.config import ConfigError, load_yaml
from utils.errors import BecoError
from utils.io import save_json, save_text
from utils.seed_stats import mean_std, paired

REPO = Path(__file__).resolve().parents[1]
SHORT = {"kept_share": "ks", "kept_precision": "kp", "dropped_precision": "dp"}
LABELS = {"kept_share": "kept share", "kept_precision": "label precision on kept pixels",
          "dropped_precision": "label precision on dropped pixels"}


def shown(path: Path) -> str:
    """``path`` from the repository root when it lies in it: the committed report names no machine's folders."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def say(msg: str) -> None:
    print(f"[mask_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_study(path: Path) -> dict[str, Any]:
    study = load_yaml(path)
    required = ("out", "base_config", "data_root", "train_images", "val_images", "first_stage_config", "grid",
                "shapes", "mask_seed", "methods", "baseline", "seeds", "train_overrides", "points")
    missing = [k for k in required if k not in study]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}")
    grid = study["grid"]
    if not isinstance(grid, dict) or len(grid) != 2 or not set(grid) <= set(TARGETS):
        raise ConfigError(f"{path}: grid must name two of {TARGETS} (the third follows from the labels' "
                          f"precision), each with a list of values; got {grid!r}")
    bad = [s for s in study["shapes"] if s not in SHAPES]
    if bad:
        raise ConfigError(f"{path}: unknown mask shapes {bad} ({', '.join(SHAPES)})")
    if study["baseline"] not in study["methods"]:
        raise ConfigError(f"{path}: baseline {study['baseline']!r} is not one of the methods {list(study['methods'])}")
    others = study.get("other_first_stages") or {}
    for name, entry in others.items():
        if not isinstance(entry, dict) or set(entry) != {"base_config", "first_stage_config"}:
            raise ConfigError(f"{path}: other_first_stages.{name} must give base_config and first_stage_config; "
                              f"got {entry!r}")
    study["other_first_stages"] = others
    study["points"] = [resolve_point(p, path, k) for k, p in enumerate(study["points"] or [])]
    return study


def resolve_point(point: Any, path: Path, k: int) -> dict[str, Any]:
    """A mask placed on the map: ``{name, kept_precision, dropped_precision[, kept_share]}``, or
    ``{name, label_quality: <tools/import_labels.py's label_quality.json, or the folder holding it>}``
    whose figures are read from that report (relative paths from the repository root)."""
    where = f"{path}: points[{k}]"
    if not isinstance(point, dict) or "name" not in point:
        raise ConfigError(f"{where} must be a mapping with a name; got {point!r}")
    if "label_quality" in point:
        if set(point) != {"name", "label_quality"}:
            raise ConfigError(f"{where}: a point read from label_quality takes no figures of its own; got {point!r}")
        report = REPO / point["label_quality"]
        report = report / QUALITY_JSON if report.is_dir() else report
        if not report.is_file():
            raise ConfigError(f"{where}: no import report at {report} (tools/import_labels.py writes {QUALITY_JSON})")
        quality = json.loads(report.read_text())
        figures = {k: quality.get(k) for k in TARGETS}
        if figures["kept_precision"] is None or figures["dropped_precision"] is None:
            raise ConfigError(f"{where}: {report} has no kept or dropped precision (the import had no ground "
                              f"truth for its ids, or no pixel was kept or dropped)")
        return {"name": point["name"], **figures, "source": shown(report)}
    missing = [t for t in ("kept_precision", "dropped_precision") if t not in point]
    if missing:
        raise ConfigError(f"{where} ({point['name']!r}) lacks {missing}; give the figures or label_quality")
    return {"kept_share": None, **point}


def cells(study: dict) -> list[tuple[str, str, dict[str, float]]]:
    """(name, shape, targets) of every grid cell, e.g. ('boundary-kp0.9-dp0.35', 'boundary', {...})."""
    keys = list(study["grid"])
    out = []
    for shape in study["shapes"]:
        for values in itertools.product(*(study["grid"][k] for k in keys)):
            targets = {k: float(v) for k, v in zip(keys, values)}
            out.append((shape + "".join(f"-{SHORT[k]}{v:g}" for k, v in targets.items()), shape, targets))
    return out


# ----------------------------------------------------------------------------- masks

def read_set(export: Path, ids: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first stage's labels and own masks (the hand-off layout)."""
    labels = [np.asarray(Image.open(export / PSEUDO_LABEL_DIR / f"{i}.png")) for i in ids]
    masks = [np.asarray(Image.open(export / MASK_DIR / f"{i}.png")) for i in ids]
    return labels, [m[..., 0] if m.ndim == 3 else m for m in masks]


def mask_record(study: dict, shape: str, targets: dict, export: Path) -> dict:
    return provenance.make_record("tools/mask_study.py masks", {
        "first_stage_labels": provenance.folder_input(export / PSEUDO_LABEL_DIR, ("*.png",))},
        {"shape": shape, "targets": targets, "mask_seed": study["mask_seed"], "train_images": study["train_images"],
         "generator": GENERATOR_VERSION})


def make_masks(study: dict, ids: list[str], labels: list[np.ndarray], gts: list[np.ndarray], export: Path,
               out: Path, overwrite: bool = False) -> dict[str, dict]:
    """Every cell's masks under <out>/masks/<cell>/irn_mask, each folder with its record and the
    figures it reached (figures.json, written last: a folder without it is made again).
    Every cell is checked first: one the labels cannot reach stops the study before any is written,
    and so does a folder made with other settings, unless ``overwrite``: then it is made again."""
    right, wrong = pool_sizes(labels, gts)
    for name, _, targets in cells(study):
        try:
            kept_counts(right, wrong, **targets)
        except BecoError as e:
            raise type(e)(f"grid cell {name}: {e}") from e
    plans = {name: provenance.plan(out / "masks" / name, mask_record(study, shape, targets, export),
                                   (MASK_DIR, "figures.json"), overwrite=False, redo_stale=overwrite)
             for name, shape, targets in cells(study)}
    figures = {}
    for name, shape, targets in cells(study):
        folder = out / "masks" / name
        provenance.commit(plans[name])
        if (folder / "figures.json").is_file():
            figures[name] = json.loads((folder / "figures.json").read_text())
            continue
        masks, reached = controlled_masks(labels, gts, shape=shape, seed=study["mask_seed"], **targets)
        for item_id, mask in zip(ids, masks):
            save_mask(folder / MASK_DIR / f"{item_id}.png", mask)
        figures[name] = {"shape": shape, "targets": targets, **reached}
        save_json(folder / "figures.json", figures[name])
        say(f"masks {name}: kept share {reached['kept_share']:.3f}, kept precision {reached['kept_precision']:.3f}, "
            f"dropped precision {reached['dropped_precision']:.3f}")
    return figures


# ----------------------------------------------------------------------------- runs

def train_run(study: dict, method: str, kind: str, seed: int, out: Path, label_dir: Path, mask_dir: Path) -> float:
    """One run through main.py (tools/noise_study.py's ``train``); the tests replace it."""
    return noise_study.train(study, method, kind, seed, out, label_dir=label_dir, mask_dir=mask_dir)


def run_list(study: dict, export: Path, out: Path) -> list[tuple[str, str, int, Path]]:
    """(kind, method, seed, mask folder) of every run: the baseline once per seed ('all': it reads
    no mask; it gets the first stage's own), the other methods on every cell."""
    runs = [("all", study["baseline"], seed, export / MASK_DIR) for seed in study["seeds"]]
    for seed in study["seeds"]:
        for name, _, _ in cells(study):
            runs += [(name, m, seed, out / "masks" / name / MASK_DIR) for m in study["methods"] if m != study["baseline"]]
    return runs


def bind_runs(study: dict, export: Path, out: Path, overwrite: bool = False) -> None:
    """The runs of a cell are reused only with that cell's masks, and the baseline's only with the
    same labels: one record per cell in <out>/runs (``_provenance_<cell>.json``); runs bound to
    other masks or labels are refused, or with ``overwrite`` deleted to be trained again."""
    labels = provenance.folder_input(export / PSEUDO_LABEL_DIR, ("*.png",))
    provenance.prepare(out / "runs", provenance.make_record("tools/mask_study.py runs", {"labels": labels}, {}),
                       ("all-*",), overwrite=False, redo_stale=overwrite, record_name="_provenance_all.json")
    for name, _, _ in cells(study):
        record = provenance.make_record("tools/mask_study.py runs", {
            "labels": labels, "masks": provenance.folder_input(out / "masks" / name)}, {})
        provenance.prepare(out / "runs", record, (f"{name}-*",), overwrite=False, redo_stale=overwrite,
                           record_name=f"_provenance_{name}.json")


def result_path(out: Path, kind: str, method: str, seed: int) -> Path:
    return out / "runs" / f"{kind}-{method}-seed{seed}.result.json"


def run_all(study: dict, export: Path, out: Path, part: tuple[int, int] = (0, 1)) -> int:
    """Train every run of this part (every ``part[1]``-th of the list from ``part[0]``) that has no
    result file yet; returns how many were trained."""
    todo = [r for k, r in enumerate(run_list(study, export, out)) if k % part[1] == part[0]
            and not result_path(out, r[0], r[1], r[2]).is_file()]
    t0 = time.time()
    for n, (kind, method, seed, mask_dir) in enumerate(todo, 1):
        miou = train_run(study, method, kind, seed, out, export / PSEUDO_LABEL_DIR, mask_dir)
        save_json(result_path(out, kind, method, seed), {"miou": miou})
        say(f"{n}/{len(todo)} runs ({time.time() - t0:.0f} s): {kind} {method} seed {seed} -> {100 * miou:.1f}")
    return len(todo)


def collect(study: dict, export: Path, out: Path) -> tuple[dict[int, float], dict[str, dict[str, dict[int, float]]]]:
    """(baseline[seed], results[cell][method][seed]) of the runs with a result file."""
    baseline: dict[int, float] = {}
    results: dict[str, dict[str, dict[int, float]]] = {}
    for kind, method, seed, _ in run_list(study, export, out):
        path = result_path(out, kind, method, seed)
        if not path.is_file():
            continue
        miou = float(json.loads(path.read_text())["miou"])
        if kind == "all":
            baseline[seed] = miou
        else:
            results.setdefault(kind, {}).setdefault(method, {})[seed] = miou
    return baseline, results


# ----------------------------------------------------------------------------- report

def aggregate(baseline: dict[int, float], results: dict[str, dict[str, dict[int, float]]]) -> dict:
    """Per cell and method: mean ± std over seeds and the gain over the baseline paired by seed
    (utils/seed_stats.paired: mean, std, 95 % t-interval, wins); ``excludes_zero`` where the
    interval lies wholly above or below 0."""
    table = {}
    for cell, by_method in results.items():
        row = {}
        for method, by_seed in by_method.items():
            m, s = mean_std(list(by_seed.values()))
            entry: dict[str, Any] = {"mean": m, "std": s, "n": len(by_seed)}
            gain = paired(by_seed, baseline)
            if gain:
                ci = gain["ci95"]
                entry.update(gain_mean=gain["mean"], gain_std=gain["std"], gain_ci95=ci, gain_wins=gain["wins"],
                             gain_n=gain["n"], excludes_zero=bool(ci and (ci[0] > 0 or ci[1] < 0)))
            row[method] = entry
        table[cell] = row
    return table


def gain_text(entry: dict | None) -> str:
    if not entry:
        return ""
    text = f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
    if "gain_mean" in entry:
        ci = entry["gain_ci95"]
        text += f" ({100 * entry['gain_mean']:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "") + ")"
        text += " *" if entry["excludes_zero"] else ""
    return text


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def report(study: dict, figures: dict, own: dict, baseline: dict, results: dict, out: Path, main_method: str = "beco",
           others: list[dict] | None = None) -> Path:
    """The table (<out>/mask_study.md, .json) and the map; ``others``: the first stage's own masks on
    the other data sets (name and figures), placed like the config's ``points``."""
    table = aggregate(baseline, results)
    placed = list(others or []) + study["points"]
    methods = [m for m in study["methods"] if m != study["baseline"]]
    b_mean, b_std = mean_std(list(baseline.values())) if baseline else (math.nan, math.nan)
    lines = ["# Mask study", "",
             f"val mIoU (%) at the last epoch, mean ± std over seeds {study['seeds']}; in brackets the gain over the "
             f"CE baseline ({study['baseline']}, all pixels: {100 * b_mean:.1f} ± {100 * b_std:.1f}), paired by seed, "
             "with its 95 % t-interval; * where the interval excludes 0. Mask figures are over non-void "
             "ground-truth pixels of the train set.", "",
             "| cell | kept share | kept precision | dropped precision | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for name, _, _ in cells(study):
        f = figures.get(name)
        if f is None:
            continue
        lines.append(f"| {name} | {f['kept_share']:.3f} | {f['kept_precision']:.3f} | {f['dropped_precision']:.3f} | "
                     + " | ".join(gain_text(table.get(name, {}).get(m)) for m in methods) + " |")
    lines.append(f"| first stage's own masks (not trained here) | {own['kept_share']:.3f} | {own['kept_precision']:.3f} | "
                 f"{own['dropped_precision']:.3f} |" + " |" * len(methods))
    for p in placed:
        lines.append(f"| {p['name']} (placed, not trained here) | {fmt(p.get('kept_share'))} | "
                     f"{fmt(p['kept_precision'])} | {fmt(p['dropped_precision'])} |" + " |" * len(methods))
    lines += ["", f"Generated by `python tools/mask_study.py` from {shown(out / 'mask_study.json')}; "
                  f"map: {shown(out / 'gain_map.png')}."]
    save_json(out / "mask_study.json", {"study": study, "mask_figures": figures, "own_mask": own, "placed": placed,
                                        "baseline": baseline, "results": results, "table": table})
    plot_map(study, figures, own, table, out / "gain_map.png", main_method, placed)
    return save_text(out / "mask_study.md", "\n".join(lines) + "\n")


def edges(values: list[float]) -> np.ndarray:
    """Cell edges around sorted axis values: midway between neighbours, half a gap beyond the ends."""
    v = np.asarray(sorted(values), float)
    if v.size == 1:
        return np.array([v[0] - 0.05, v[0] + 0.05])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def plot_map(study: dict, figures: dict, own: dict, table: dict, path: Path, method: str = "beco",
             placed: list[dict] | None = None) -> None:
    """One panel per mask shape: the gain of ``method`` over the baseline per cell (points of mIoU),
    each cell's text its mean and t-interval, a thick outline where the interval excludes 0; the
    first stage's own masks and the ``placed`` ones (other data sets', the config's points) at their
    figures."""
    import matplotlib  # only the report draws; the study's other steps never load matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    xkey, ykey = list(study["grid"])
    xs, ys = sorted(study["grid"][xkey]), sorted(study["grid"][ykey])
    shapes = study["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes) + 1, 4.4), dpi=120, squeeze=False,
                             layout="constrained")
    gains = {name: 100 * table.get(name, {}).get(method, {}).get("gain_mean", math.nan) for name, _, _ in cells(study)}
    finite = [abs(g) for g in gains.values() if np.isfinite(g)]
    lim = max(finite) if finite else 1.0
    mesh = None
    for ax, shape in zip(axes[0], shapes):
        grid = np.full((len(ys), len(xs)), math.nan)
        for name, s, targets in cells(study):
            if s != shape:
                continue
            i, j = ys.index(targets[ykey]), xs.index(targets[xkey])
            grid[i, j] = gains[name]
            entry = table.get(name, {}).get(method, {})
            ci = entry.get("gain_ci95")
            text = f"{gains[name]:+.1f}" if np.isfinite(gains[name]) else "not run"
            text += f"\n[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
            third = next(k for k in TARGETS if k not in study["grid"])
            if name in figures:
                text += f"\n{SHORT[third]} {figures[name][third]:.2f}"
            strong = np.isfinite(gains[name]) and abs(gains[name]) > 0.6 * lim
            ax.text(xs[j], ys[i], text, ha="center", va="center", fontsize=7, color="white" if strong else "black")
            if entry.get("excludes_zero"):
                ex, ey = edges(xs), edges(ys)
                # Inset a little, so that the outline stays inside the cell and off the axes' frame.
                dx, dy = 0.04 * (ex[j + 1] - ex[j]), 0.04 * (ey[i + 1] - ey[i])
                ax.add_patch(Rectangle((ex[j] + dx, ey[i] + dy), ex[j + 1] - ex[j] - 2 * dx, ey[i + 1] - ey[i] - 2 * dy,
                                       fill=False, linewidth=3, edgecolor="black", zorder=4))
        mesh = ax.pcolormesh(edges(xs), edges(ys), np.ma.masked_invalid(grid), cmap="RdBu", vmin=-lim, vmax=lim)
        points = [("first stage's own", own)] + [(p["name"], p) for p in placed or []]
        for k, (label, p) in enumerate(points):
            if p.get(xkey) is not None and p.get(ykey) is not None:
                ax.scatter([p[xkey]], [p[ykey]], marker="X" if k == 0 else "o", s=60, color="black", zorder=3)
                # Alternately above and below: points of similar masks lie close together.
                ax.annotate(label, (p[xkey], p[ykey]), textcoords="offset points", xytext=(6, 4 if k % 2 else -10),
                            fontsize=7)
        ax.set_xlabel(LABELS[xkey])
        ax.set_ylabel(LABELS[ykey])
        ax.set_title(f"{method} − CE baseline, {shape} masks", fontsize=9)
        ax.autoscale()
    fig.colorbar(mesh, ax=axes[0].tolist(), label="val mIoU gain (points); outlined: 95 % interval excludes 0")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main

def run_study(study: dict, export: Path, out: Path, ids: list[str], gts: list[np.ndarray],
              part: tuple[int, int] = (0, 1), report_only: bool = False, others: list[dict] | None = None,
              overwrite: bool = False) -> Path:
    """Steps 2-4 on the first stage's labels in ``export`` (step 1 is ``main``'s, and so are
    ``others``, the own masks' figures on the other data sets)."""
    labels, own_masks = read_set(export, ids)
    own = mask_figures(labels, own_masks, gts)
    say(f"first stage's own masks: kept share {own['kept_share']:.3f}, kept precision {own['kept_precision']:.3f}, "
        f"dropped precision {own['dropped_precision']:.3f}")
    figures = make_masks(study, ids, labels, gts, export, out, overwrite)
    bind_runs(study, export, out, overwrite)
    if not report_only:
        run_all(study, export, out, part)
    baseline, results = collect(study, export, out)
    return report(study, figures, own, baseline, results, out, others=others)


def other_first_stage(name: str, entry: dict, out: Path) -> dict[str, Any]:
    """The first stage's own masks on another data set (its BECO config's synthetic data, staged as
    the demo stages it), measured against that set's train ground truth: a point of the map."""
    cfg = load_config(REPO / entry["base_config"])
    say(f"{name}: data {cfg.data.root}, first stage {entry['first_stage_config']}")
    demo.stage_data(cfg)
    export = out / "other_first_stages" / name / "export"
    demo.stage_first_stage(cfg, REPO / entry["first_stage_config"], out / "other_first_stages" / name / "work",
                           export, None)
    ids, gts = noise_study.train_ground_truth(cfg)
    labels, masks = read_set(export, ids)
    figures = mask_figures(labels, masks, gts)
    say(f"{name}: own masks kept share {figures['kept_share']:.3f}, kept precision {figures['kept_precision']:.3f}, "
        f"dropped precision {figures['dropped_precision']:.3f}")
    return {"name": f"first stage's own, {name}", **figures, "source": shown(export)}


def share_cores(parts: int) -> None:
    """Give the training runs of each of ``parts`` processes its share of the cores. Measured on
    the 2-core VM: two parts each left at torch's default of 2 threads ran a one-net run in 10 min,
    at one thread each in 1.5 min (oversubscribed threads wait on each other). A thread count the
    user set (OMP_NUM_THREADS) is kept."""
    if parts > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parts))
        say(f"{parts} processes share the {os.cpu_count()} cores: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
            "for this one's runs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "mask_study.yaml")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the config's out)")
    p.add_argument("--part", default="0/1", help="i/n: train every n-th run from the i-th (n processes share the list)")
    p.add_argument("--report-only", action="store_true", help="train nothing: the table and map of the runs done")
    p.add_argument("--overwrite", action="store_true",
                   help="make again the masks made with other settings, and delete the runs trained on them or on "
                        "other labels (refused without it)")
    args = p.parse_args(argv)
    study = load_study(args.config)
    try:
        part = tuple(int(x) for x in args.part.split("/"))
        assert len(part) == 2 and 0 <= part[0] < part[1]
    except (ValueError, AssertionError):
        raise SystemExit(f"mask_study: --part must be i/n with 0 <= i < n, got {args.part!r}")
    share_cores(part[1])
    out = (args.out or Path(study["out"])).resolve()
    cfg = load_config(REPO / study["base_config"], noise_study.data_overrides(study))
    say(f"data: {cfg.data.root} ({study['train_images']} train, {study['val_images']} val)")
    demo.stage_data(cfg)
    export = out / "first_stage" / "export"
    demo.stage_first_stage(cfg, REPO / study["first_stage_config"], out / "first_stage" / "work", export, None)
    ids, gts = noise_study.train_ground_truth(cfg)
    others = [other_first_stage(name, entry, out) for name, entry in study["other_first_stages"].items()]
    path = run_study(study, export, out, ids, gts, part, args.report_only, others, args.overwrite)
    say(f"wrote {path}, {out / 'mask_study.json'} and {out / 'gain_map.png'}")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(noise_study.run_main(main, "mask_study"))

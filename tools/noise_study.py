"""Where does BECO help? A controlled label-noise study on the synthetic set.

    python tools/noise_study.py                              # configs/noise_study.yaml, ~90 min on 2 cores
    python tools/noise_study.py --config my_study.yaml
    python tools/noise_study.py --seeds 0 --methods beco baseline --error-types boundary   # a part of it

Steps, each skipped when its output is there (a killed study resumes):
1. the synthetic set (demo.yaml's generator, a larger val split);
2. the first stage's own pseudo-labels on it (run_sample.py with the demo's options);
3. one label set per error type, all at one pixel error rate (the first stage's, or a number):
   ``boundary`` (outlines displaced within ``band`` px), ``region`` (false blobs, missed objects,
   class swaps, all beyond ``band`` px from a true boundary), ``first_stage`` (its own labels);
   each with confidence masks from one rule (datasets.synthetic.voc.simulated_mask, which applies
   datasets/handoff.py's);
4. every method (BECO, the CE baseline, BECO without co-training, BECO without the boundary
   weights) trained on every label set with every seed, through main.py;
5. the table (val mIoU at the last epoch, mean ± std over seeds; the gain over the baseline,
   paired by seed) and a figure of the gains: <out>/noise_study.md, .json, gains.png.
Any second-stage method can be compared: add it under ``methods`` (a config and overrides).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tools import demo  # noqa: E402  (tools/demo.py: the data and first-stage stages are the demo's)
from datasets.synthetic.label_noise import boundary_errors, error_rate, region_errors
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.synthetic.voc import near_boundary, simulated_mask
from utils import provenance
from engine.config import load_config
from utils.config import ConfigError, load_yaml
from utils.errors import exit_status
from utils.io import read_jsonl, save_json, save_png, save_text
from utils.seed_stats import mean_std, paired

REPO = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[noise_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_study(path: Path) -> dict[str, Any]:
    study = load_yaml(path)
    required = ("out", "base_config", "data_root", "train_images", "val_images", "first_stage_config", "target_rate",
                "band", "boundary_cell", "region_blob_radius", "mask_keep", "mask_score_noise", "noise_seed",
                "error_types", "methods", "seeds", "train_overrides")
    missing = [k for k in required if k not in study]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}")
    unknown = set(study["error_types"]) - {"boundary", "region", "first_stage"}
    if unknown:
        raise ConfigError(f"{path}: unknown error types {sorted(unknown)} (boundary, region, first_stage)")
    rate = study["target_rate"]
    if rate != "first_stage" and not (isinstance(rate, (int, float)) and 0 < rate < 1):
        raise ConfigError(f"{path}: target_rate must be 'first_stage' or a number in (0, 1), got {rate!r}")
    return study


# ----------------------------------------------------------------------------- label sets

def data_overrides(study: dict) -> list[str]:
    return [f"data.root={study['data_root']}", f"data.synthetic.train={study['train_images']}",
            f"data.synthetic.val={study['val_images']}"]


def train_ground_truth(cfg) -> tuple[list[str], list[np.ndarray]]:
    files = demo.train_files(cfg)
    return files.ids, [np.asarray(Image.open(files.gt(i))) for i in files.ids]


def write_set(folder: Path, ids: list[str], labels: list[np.ndarray], study: dict, seed: int) -> None:
    """Labels and their confidence masks in the layout main.py reads (data.pseudo_label_dir, data.mask_dir)."""
    rng = np.random.default_rng(seed)
    for sub in (PSEUDO_LABEL_DIR, MASK_DIR):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for item_id, label in zip(ids, labels):
        save_png(folder / PSEUDO_LABEL_DIR / f"{item_id}.png", label.astype(np.uint8))
        save_png(folder / MASK_DIR / f"{item_id}.png",
                 simulated_mask(rng, label.astype(np.uint8), study["mask_keep"], study["mask_score_noise"]))


def describe(labels: list[np.ndarray], gts: list[np.ndarray], band: float) -> dict:
    """Error rate and where the errors are: within ``band`` px of a true boundary or beyond."""
    wrong = near = valid = 0
    for label, gt in zip(labels, gts):
        ok = gt != 255
        bad = ok & (label != gt)
        valid += int(ok.sum())
        wrong += int(bad.sum())
        near += int((bad & near_boundary(gt, band)).sum())
    return {"error_rate": wrong / max(valid, 1), "share_within_band": near / max(wrong, 1)}


# What the label sets depend on (a change needs new sets and new runs).
LABEL_KEYS = ("train_images", "target_rate", "band", "boundary_cell", "region_blob_radius", "mask_keep",
              "mask_score_noise", "noise_seed")


def make_label_sets(study: dict, cfg, first_stage_export: Path, out: Path) -> dict[str, dict]:
    """Each error type's labels and masks under <out>/labels/<type>; returns their statistics.
    <out>/labels records its settings and the first stage's labels it started from
    (utils/provenance.py): a study with other label settings is refused, never mixed in."""
    labels_dir = out / "labels"
    stats_path = labels_dir / "stats.json"
    settings = {k: study[k] for k in LABEL_KEYS}
    own_dir = first_stage_export / PSEUDO_LABEL_DIR
    inputs = {"first_stage_labels": provenance.folder_input(own_dir, ("*.png",))} if own_dir.is_dir() else {}
    record = provenance.make_record("tools/noise_study.py labels", inputs, settings)
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    legacy = stats.pop("_settings", None)  # the record of studies made before utils/provenance.py
    if legacy == settings and provenance.read_record(labels_dir / provenance.RECORD_NAME) is None:
        save_json(labels_dir / provenance.RECORD_NAME, record)
    provenance.prepare(labels_dir, record, ("*",), overwrite=False)
    # The runs under <out>/runs trained on these labels: they are reused only with them.
    provenance.prepare(out / "runs", provenance.make_record("tools/noise_study.py runs", {
        "labels": provenance.folder_input(labels_dir)}, {}), ("*",), overwrite=False)
    if stats and set(stats) >= set(study["error_types"]):
        return stats
    ids, gts = train_ground_truth(cfg)
    own = None
    if "first_stage" in study["error_types"] or study["target_rate"] == "first_stage":
        own = [np.asarray(Image.open(first_stage_export / PSEUDO_LABEL_DIR / f"{i}.png")) for i in ids]
        say(f"first stage's labels: error rate {error_rate(own, gts):.4f}")
    target = error_rate(own, gts) if study["target_rate"] == "first_stage" else float(study["target_rate"])
    say(f"target error rate of every set: {target:.4f}")
    stats = {}
    for kind in study["error_types"]:
        if kind == "first_stage":
            labels = own
        elif kind == "boundary":
            labels, rate = boundary_errors(gts, target, study["band"], study["boundary_cell"], study["noise_seed"])
            if abs(rate - target) > 0.005:
                say(f"boundary errors reach {rate:.4f} at most within {study['band']} px (target {target:.4f})")
        else:
            labels, rate, counts = region_errors(gts, target, study["band"], cfg.data.num_classes, study["noise_seed"],
                                                 tuple(study["region_blob_radius"]))
        write_set(out / "labels" / kind, ids, labels, study, study["noise_seed"])
        stats[kind] = describe(labels, gts, study["band"])
        if kind == "region":
            stats[kind]["errors"] = counts
        say(f"{kind}: error rate {stats[kind]['error_rate']:.4f}, "
            f"{100 * stats[kind]['share_within_band']:.1f} % of errors within {study['band']} px of a boundary")
    save_json(stats_path, stats)
    return stats


# ----------------------------------------------------------------------------- training

def final_miou(run_dir: Path) -> float | None:
    log = read_jsonl(run_dir / "val_log.jsonl")
    return float(log[-1]["miou"]) if log else None


def train(study: dict, method: str, kind: str, seed: int, out: Path, label_dir: Path | None = None,
          mask_dir: Path | None = None) -> float:
    """One run, <out>/runs/<kind>-<method>-seed<seed>, on <out>/labels/<kind>'s labels and masks
    (``label_dir`` / ``mask_dir`` name others: tools/mask_study.py's); its last val mIoU."""
    spec = study["methods"][method]
    label_dir = label_dir or out / "labels" / kind / PSEUDO_LABEL_DIR
    mask_dir = mask_dir or out / "labels" / kind / MASK_DIR
    config = REPO / spec["config"]
    tag = f"{kind}-{method}-seed{seed}"
    run_dir = out / "runs" / tag
    overrides = [*data_overrides(study), *study["train_overrides"], *spec.get("overrides", []),
                 f"logging.path_base={out / 'runs'}", "logging.run_id=null", f"logging.tag={tag}",
                 f"data.pseudo_label_dir={Path(label_dir).resolve()}", f"data.mask_dir={Path(mask_dir).resolve()}",
                 f"train.seed={seed}"]
    cfg = load_config(config, overrides)
    if not demo.training_finished(run_dir, cfg.train.epochs):
        say(f"training {tag}")
        demo.stage_train(config, tag, cfg, out / "runs", overrides)
    miou = final_miou(run_dir)
    if miou is None:
        raise SystemExit(f"noise_study: {run_dir} has no validation result")
    return miou


# ----------------------------------------------------------------------------- report

def summarise(results: dict[str, dict[str, dict[int, float]]], baseline: str = "baseline") -> dict:
    """results[kind][method][seed] = mIoU -> per cell mean/std, and per method its gain over the
    baseline paired by seed (mean/std of the per-seed differences)."""
    table = {}
    for kind, by_method in results.items():
        row = {}
        for method, by_seed in by_method.items():
            m, s = mean_std(list(by_seed.values()))
            cell = {"mean": m, "std": s, "n": len(by_seed)}
            if method != baseline and baseline in by_method:
                gain = paired(by_seed, by_method[baseline])
                if gain:
                    cell.update(gain_mean=gain["mean"], gain_std=gain["std"], gain_ci95=gain["ci95"],
                                gain_wins=gain["wins"])
            row[method] = cell
        table[kind] = row
    return table


def report(study: dict, stats: dict, results: dict, out: Path) -> Path:
    table = summarise(results)
    methods = list(study["methods"])
    lines = ["# Label-noise study", "",
             f"val mIoU (%) at the last epoch, mean ± std over seeds {study['seeds']}; in brackets the gain over "
             "the CE baseline, paired by seed. " + rate_note(stats, study), "",
             "| error type | error rate | errors within band | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for kind in study["error_types"]:
        if kind not in table:
            continue
        cells = []
        for m in methods:
            c = table[kind].get(m)
            if c is None:
                cells.append("")
                continue
            text = f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"
            if "gain_mean" in c:
                text += f" ({100 * c['gain_mean']:+.1f} ± {100 * c['gain_std']:.1f})"
            cells.append(text)
        s = stats[kind]
        lines.append(f"| {kind} | {100 * s['error_rate']:.1f} % | {100 * s['share_within_band']:.0f} % | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Band: {study['band']} px. Generated by `python tools/noise_study.py` from "
              f"{out / 'noise_study.json'}."]
    save_json(out / "noise_study.json", {"study": study, "label_stats": stats, "results": results, "table": table})
    plot_gains(table, study, out / "gains.png")
    return save_text(out / "noise_study.md", "\n".join(lines) + "\n")


def rate_note(stats: dict, study: dict) -> str:
    rates = {k: stats[k]["error_rate"] for k in study["error_types"] if k in stats}
    if max(rates.values()) - min(rates.values()) < 0.005:
        return "Every label set has the same pixel error rate."
    target = study["target_rate"]
    return (f"The generated sets are at the target error rate ({target if target == 'first_stage' else f'{100 * target:.1f} %'})"
            f"{' where the generator reaches it' if 'boundary' in rates else ''}; "
            + ("the first stage's labels are at their own rate. " if "first_stage" in rates else "")
            + "Compare gains, not mIoU, across rows.")


def plot_gains(table: dict, study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [k for k in study["error_types"] if k in table]
    methods = [m for m in study["methods"] if m != "baseline"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        means = [100 * table[k].get(m, {}).get("gain_mean", math.nan) for k in kinds]
        stds = [100 * table[k].get(m, {}).get("gain_std", 0.0) for k in kinds]
        ax.bar(np.arange(len(kinds)) + (j - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=m)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_ylabel("val mIoU gain over CE baseline (points)")
    ax.set_title("Gain over the baseline per error type (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "noise_study.yaml")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the config's out)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the config's seeds")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the config's methods")
    p.add_argument("--error-types", nargs="+", default=None, help="a subset of the config's error types")
    args = p.parse_args(argv)
    study = load_study(args.config)
    for key, value in (("seeds", args.seeds), ("methods", args.methods), ("error_types", args.error_types)):
        if value is not None:
            allowed = study[key]
            bad = [v for v in value if v not in allowed]
            if bad:
                raise SystemExit(f"noise_study: --{key.replace('_', '-')} {bad} not in the config's {list(allowed)}")
            study[key] = {k: allowed[k] for k in value} if isinstance(allowed, dict) else list(value)
    if "baseline" not in study["methods"]:
        say("no 'baseline' method: the table has no gains")
    out = (args.out or Path(study["out"])).resolve()
    cfg = load_config(REPO / study["base_config"], data_overrides(study))
    say(f"data: {cfg.data.root} ({study['train_images']} train, {study['val_images']} val)")
    demo.stage_data(cfg)
    export = out / "first_stage" / "export"
    if "first_stage" in study["error_types"] or study["target_rate"] == "first_stage":
        demo.stage_first_stage(cfg, REPO / study["first_stage_config"], out / "first_stage" / "work", export, None)
    stats = make_label_sets(study, cfg, export, out)
    results: dict[str, dict[str, dict[int, float]]] = {}
    total = len(study["error_types"]) * len(study["methods"]) * len(study["seeds"])
    done = 0
    t0 = time.time()
    for seed in study["seeds"]:
        for kind in study["error_types"]:
            for method in study["methods"]:
                results.setdefault(kind, {}).setdefault(method, {})[seed] = train(study, method, kind, seed, out)
                done += 1
                say(f"{done}/{total} runs ({time.time() - t0:.0f} s): {kind} {method} seed {seed} -> "
                    f"{100 * results[kind][method][seed]:.1f}")
                report(study, stats, results, out)  # the table so far, after every run
    path = report(study, stats, results, out)
    say(f"wrote {path}, {out / 'noise_study.json'} and {out / 'gains.png'}")
    print(path.read_text())
    return 0


def run_main(main, name: str) -> int:
    """``main()``'s exit status, a project error or a failed step's command as one line on stderr
    (tools/mask_study.py uses it too)."""
    try:
        return exit_status(main, f"{name}: error")
    except subprocess.CalledProcessError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run_main(main, "noise_study"))

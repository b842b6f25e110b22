"""`make demo`: the whole BECO method on the embedded synthetic data, end to end on a CPU.

    python tools/demo.py [--dataset voc|coco] [--out data/logging/demo] [--seed N] [--fresh]

Stages, a line each (the tools they run show their own progress bars):
  1. data         the synthetic VOC-format set of configs/demo.yaml (data.synthetic), reused
                  when it is already there with the same settings; --dataset coco: the synthetic
                  COCO 2014-format tree of configs/demo_coco.yaml, prepared by tools/prepare_coco.py's
                  steps (masks, id lists, image-level labels), and the *_coco configs below
  2. first_stage  first-stage/irn/run_sample.py with configs/first_stage/demo.yaml: CAM training,
                  CAMs, IRN training, random-walk pseudo-labels, confidence masks
  3. train_beco   main.py with configs/demo.yaml on those pseudo-labels and masks
  4. train_baseline  main.py with configs/demo_baseline.yaml (one net, plain CE) on the same labels
  5. test         main.py --test and test.py (without and with dense CRF) for both
  6. report       <out>/results.md and results.json, curves.png, samples.png

Every number of the report is read from what the stages wrote; nothing is typed in. A rerun
picks up where the last one stopped (finished stages are skipped, a killed training resumes
from its latest_ckpt.pth); --fresh deletes the demo's own outputs in <out> first (a folder the
demo did not record making is refused, never deleted; utils/provenance.py). Sizes, epochs and backbones live in
the three config files, not here.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from datasets.build import dataset_entry
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.segmentation import EvalSet
from datasets.synthetic.voc import near_boundary
from engine import results_card as card
from engine.config import load_config
from engine.inference import load_test_nets, logits_folder_name, predict_maps
from utils import provenance
from utils.config import Config
from utils.errors import exit_status
from utils.io import read_jsonl, save_json, save_text
from utils.seed_stats import paired, summary
from utils.voc import IGNORE_INDEX, colorize

REPO = Path(__file__).resolve().parents[1]

# --dataset -> (BECO config, baseline config, first-stage settings, default --out)
DEMOS = {
    "voc": ("demo.yaml", "demo_baseline.yaml", "first_stage/demo.yaml", "data/logging/demo"),
    "coco": ("demo_coco.yaml", "demo_coco_baseline.yaml", "first_stage/demo_coco.yaml", "data/logging/demo_coco"),
}
STAGES = ("data", "first_stage", "train_beco", "train_baseline", "test", "report")
RUNS = {"beco": "train_beco", "baseline": "train_baseline"}  # run folder -> stage that trains it
SCORES = {"no_crf": "val_pred_scores.json", "crf": "val_pred_crf_scores.json"}  # what test.py writes in a run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DEMOS), default="voc",
                   help="the embedded data set: voc (the synthetic VOC-format set) or coco (a synthetic "
                        "COCO 2014-format tree, through tools/prepare_coco.py's steps); picks the configs "
                        "and --out below (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="everything the demo writes (voc: data/logging/demo, "
                                                          "coco: data/logging/demo_coco)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of both stages' training (default: the configs' train.seed and seed)")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                   help="run the whole pipeline once per seed, in <out>/seed<S>/, and report the mean ± std "
                        "of every number and the paired BECO - baseline difference in <out>/results.md "
                        "(curves.png: mean ± std band); each seed resumes like a single run")
    p.add_argument("--fresh", action="store_true",
                   help="delete the demo's outputs in --out first instead of resuming (only a folder the demo made)")
    p.add_argument("--beco-config", type=Path, default=None, help="default: configs/demo[_coco].yaml")
    p.add_argument("--baseline-config", type=Path, default=None, help="default: configs/demo[_coco]_baseline.yaml")
    p.add_argument("--first-stage-config", type=Path, default=None,
                   help="first-stage settings, run_sample.py's --config (default: configs/first_stage/demo[_coco].yaml)")
    p.add_argument("--samples", type=int, default=6, help="rows of samples.png")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seed is not None:
        p.error("--seed and --seeds exclude each other")
    beco, baseline, first_stage, out = DEMOS[args.dataset]
    args.beco_config = args.beco_config or REPO / "configs" / beco
    args.baseline_config = args.baseline_config or REPO / "configs" / baseline
    args.first_stage_config = args.first_stage_config or REPO / "configs" / first_stage
    args.out = args.out or Path(out)
    return args


# ----------------------------------------------------------------------------- helpers


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: comma-separated integers expected, got {text!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: two or more distinct seeds expected, got {text!r}")
    return seeds


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str]) -> None:
    """Run a stage's tool with its output on our console; stop the demo if it fails."""
    say("$ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"demo: stage command failed with exit code {r.returncode}: {' '.join(map(str, cmd))}")


def _run_sample():
    """The first-stage driver module, imported only when a first-stage stage runs (it loads the
    whole first stage)."""
    from irn import run_sample
    return run_sample


def first_stage_settings(path: Path):
    """The first stage's settings file, checked as run_sample.py checks it."""
    return _run_sample().settings.load_settings(path)


def train_files(cfg: Config):
    entry = dataset_entry(cfg.data.dataset)
    return entry.files(cfg.data, entry.train_split(cfg.data))


def train_ids(cfg: Config) -> list[str]:
    return train_files(cfg).ids


# How run_sample.py finds each data set's tree under data.root.
FIRST_STAGE_DATA = {
    "voc": lambda root: ["--voc12_root", Path(root) / "VOC2012"],
    "coco": lambda root: ["--dataset", "coco", "--coco_root", Path(root)],
}


def training_finished(run_dir: Path, epochs: int) -> bool:
    log = read_jsonl(run_dir / "val_log.jsonl")
    return bool(log) and log[-1]["epoch"] >= epochs and (run_dir / "best_ckpt.pth").is_file()


class Timings:
    """Wall time of each stage, kept in <out>/timings.json: a skipped stage keeps the time it took."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.data[stage] = round(seconds, 1)
        save_json(self.path, self.data)


def peak_rss_mb(path: Path) -> float:
    """Largest resident memory of this process or any stage process, over this run and the
    earlier runs into the same folder (a resumed run's skipped stages used memory then)."""
    now = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # kB on Linux
    before = json.loads(path.read_text())["peak_rss_mb"] if path.is_file() else 0.0
    peak = max(now, before)
    save_json(path, {"peak_rss_mb": peak})
    return peak


# ----------------------------------------------------------------------------- stages


def stage_data(cfg: Config) -> dict | str:
    """The config's synthetic set; one made by the generator with other settings is replaced
    (it is the demo's own output), anything else under data.root is refused by the generator."""
    if cfg.data.synthetic is None:
        raise SystemExit(f"demo: the BECO config has no data.synthetic section (data.root {cfg.data.root})")
    entry = dataset_entry(cfg.data.dataset)
    summary_path = Path(cfg.data.root) / entry.synthetic_summary
    before = summary_path.read_text() if summary_path.is_file() else None
    entry.make_synthetic(Path(cfg.data.root), cfg.data.synthetic, overwrite=before is not None)
    return "skipped" if summary_path.read_text() == before else {}


def first_stage_finished(work: Path, export: Path, ids: list[str]) -> bool:
    """Every step recorded in summary.json and every id's label and mask exported."""
    path = work / "summary.json"
    if not path.is_file():
        return False
    steps = json.loads(path.read_text()).get("steps", {})
    done = all(s in steps and not steps[s].get("metrics", {}).get("skipped") for s in _run_sample().STEPS)
    return done and all((export / d / f"{i}.png").is_file() for d in (PSEUDO_LABEL_DIR, MASK_DIR) for i in ids)


def stage_first_stage(cfg: Config, settings: Path, work: Path, export: Path, seed: int | None) -> dict | str:
    ids = train_ids(cfg)
    if first_stage_finished(work, export, ids):
        return "skipped"
    # The data set's tree is the BECO config's data.root (FIRST_STAGE_DATA), whatever the settings say.
    cmd = [sys.executable, REPO / "first-stage/irn/run_sample.py", "--config", settings,
           *FIRST_STAGE_DATA[cfg.data.dataset](cfg.data.root), "--work_dir", work, "--steps", "all",
           "--export_to", export] + (["--seed", seed] if seed is not None else [])
    run(cmd)  # run_sample.py itself skips outputs that exist, so a killed run resumes
    return {}


def second_stage_overrides(out: Path, export: Path, seed: int | None) -> list[str]:
    over = [f"logging.path_base={out}", "logging.run_id=null",
            f"data.pseudo_label_dir={export.resolve() / PSEUDO_LABEL_DIR}",
            f"data.mask_dir={export.resolve() / MASK_DIR}"]
    if seed is not None:
        over.append(f"train.seed={seed}")
    return over


def stage_train(config: Path, tag: str, cfg: Config, out: Path, overrides: list[str]) -> dict | str:
    run_dir = out / tag
    if training_finished(run_dir, cfg.train.epochs):
        return "skipped"
    cmd = [sys.executable, REPO / "main.py", "--config", config, *overrides, f"logging.tag={tag}"]
    if (run_dir / "latest_ckpt.pth").is_file():
        say(f"{tag}: resuming from {run_dir / 'latest_ckpt.pth'}")
        cmd += ["--ckpt", run_dir / "latest_ckpt.pth"]
    elif run_dir.exists():
        # The demo's own run, killed before its first checkpoint: nothing to resume, start it again
        # (main.py never starts a run in a folder that holds one).
        say(f"{tag}: {run_dir} holds a run stopped before its first checkpoint; starting it again")
        shutil.rmtree(run_dir)
    run(cmd)
    return {}


def stage_test(config: Path, tag: str, cfg: Config, out: Path, overrides: list[str]) -> dict:
    run_dir = out / tag
    run([sys.executable, REPO / "main.py", "--config", config, "--test", "--ckpt", run_dir / "best_ckpt.pth",
         *overrides, f"logging.tag={tag}"])
    for crf in (False, True):
        run([sys.executable, REPO / "test.py", "--logits_dir", run_dir / logits_folder_name(cfg), "--mode", "val"]
            + (["--crf"] if crf else []))
    return {}


def _tested(run_dir: Path) -> bool:
    ckpt = run_dir / "best_ckpt.pth"
    scores = [run_dir / name for name in SCORES.values()]
    return ckpt.is_file() and all(p.is_file() and p.stat().st_mtime > ckpt.stat().st_mtime for p in scores)


# ----------------------------------------------------------------------------- report


CURVES = (("beco", "o-", "BECO"), ("baseline", "s--", "CE baseline"))


def plot_curves(out: Path, logs: dict[str, list[dict[int, float]]] | None = None) -> Path:
    """<out>/curves.png: val mIoU per epoch of BECO and the baseline. ``logs[tag]``: one
    {epoch: mIoU} per seed (default: the runs under <out>); with several, the mean and a
    ± 1 std band over the epochs every seed has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    if logs is None:
        logs = {tag: [{r["epoch"]: r["miou"] for r in read_jsonl(out / tag / "val_log.jsonl")}] for tag, *_ in CURVES}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for tag, style, label in CURVES:
        runs = [log for log in logs.get(tag, []) if log]
        if not runs:
            continue
        epochs = sorted(set.intersection(*(set(log) for log in runs)))
        vals = 100 * np.array([[log[e] for e in epochs] for log in runs])
        line, = ax.plot(epochs, vals.mean(0), style, label=label if len(runs) == 1 else f"{label} (mean of {len(runs)} seeds)")
        if len(runs) > 1:
            std = vals.std(0, ddof=1)
            ax.fill_between(epochs, vals.mean(0) - std, vals.mean(0) + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    several = max(len(v) for v in logs.values()) > 1
    ax.set_title("Synthetic demo: val mIoU per epoch" + (" (band: ± 1 std, seeds)" if several else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    tmp = path.with_name(".curves.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def predict_train_images(cfg: Config, ckpt: Path, ids: list[str]) -> dict[str, Any]:
    """Full-resolution argmax of a run's nets on training images (what samples.png shows)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    data = EvalSet(cfg.data, dataset_entry(cfg.data.dataset).train_split(cfg.data), with_labels=False)
    index = {i: k for k, i in enumerate(data.ids)}
    nets = load_test_nets(cfg, ckpt, torch.device("cpu"))
    preds = {}
    with torch.no_grad():
        for i in ids:
            item = data[index[i]]
            _, logits = predict_maps(nets, item["image"][None], cfg)
            h, w = item["size"].tolist()
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=cfg.model.align_corners)
            preds[i] = logits.argmax(1)[0].numpy().astype(np.uint8)
    return preds


def train_maps(cfg: Config, export: Path, i: str):
    """(ground truth, pseudo-label, mask as bool) of training id ``i`` (the synthetic sets hold
    ground truth for their training images)."""
    import numpy as np
    from PIL import Image
    return (np.asarray(Image.open(train_files(cfg).gt(i))),
            np.asarray(Image.open(export / PSEUDO_LABEL_DIR / f"{i}.png")),
            np.asarray(Image.open(export / MASK_DIR / f"{i}.png").convert("L")) > 0)


def plot_samples(out: Path, cfg_beco: Config, cfg_base: Config, export: Path, n: int) -> Path:
    """Rows: image | pseudo-label | confidence mask | baseline | BECO | ground truth (VOC palette)."""
    import numpy as np
    from PIL import Image, ImageDraw
    ids = train_ids(cfg_beco)[:n]
    beco = predict_train_images(cfg_beco, out / "beco" / "best_ckpt.pth", ids)
    base = predict_train_images(cfg_base, out / "baseline" / "best_ckpt.pth", ids)
    titles = ["image", "pseudo-label", "mask (white = kept)", "CE baseline", "BECO", "ground truth"]
    rows = []
    for i in ids:
        image = np.asarray(Image.open(train_files(cfg_beco).image(i)).convert("RGB"))
        gt, pseudo, kept = train_maps(cfg_beco, export, i)
        mask = kept.astype(np.uint8) * 255
        tiles = [image, colorize(pseudo), np.repeat(mask[..., None], 3, 2), colorize(base[i]), colorize(beco[i]),
                 colorize(gt)]
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(rows, 0)
    scale = 2  # the demo's images are small; nearest-neighbour keeps labels crisp
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    header = Image.new("RGB", (picture.width, 24), "white")
    draw = ImageDraw.Draw(header)
    tile_w = (image.shape[1] + 4) * scale
    for k, t in enumerate(titles):
        draw.text((k * tile_w + 4, 6), t, fill="black")
    canvas = Image.new("RGB", (picture.width, picture.height + header.height), "white")
    canvas.paste(header, (0, 0))
    canvas.paste(picture, (0, header.height))
    path = out / "samples.png"
    canvas.save(path)
    return path


def label_error_profile(cfg: Config, export: Path, radius: float = 3.0) -> dict:
    """Where the first stage's pseudo-labels are wrong (train_aug against its ground truth, void
    ignored): error rate within ``radius`` px of a true boundary and farther away, the share of
    all errors that lie near a boundary, and the share of errors the confidence mask drops."""
    n = dict.fromkeys(("near", "near_wrong", "far", "far_wrong", "wrong_dropped"), 0)
    for i in train_ids(cfg):
        gt, pseudo, kept = train_maps(cfg, export, i)
        valid = gt != IGNORE_INDEX
        wrong = valid & (pseudo != gt)
        near = near_boundary(gt, radius)
        n["near"] += int((valid & near).sum())
        n["near_wrong"] += int((wrong & near).sum())
        n["far"] += int((valid & ~near).sum())
        n["far_wrong"] += int((wrong & ~near).sum())
        n["wrong_dropped"] += int((wrong & ~kept).sum())
    wrong = n["near_wrong"] + n["far_wrong"]
    return {"radius_px": radius, "error_rate_near": n["near_wrong"] / max(n["near"], 1),
            "error_rate_far": n["far_wrong"] / max(n["far"], 1),
            "errors_near_share": n["near_wrong"] / max(wrong, 1), "errors_dropped_share": n["wrong_dropped"] / max(wrong, 1)}


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def best_swept_cams(eval_cam: dict, eval_sem: dict) -> dict:
    """The CAMs at the sweep's best threshold (eval_sem_seg picked it): the fair rival of the
    random walk, since CAMs learned from scratch are best thresholded far above 0.15."""
    thres = eval_sem.get("best_cam_thres")
    if thres is None:
        return {"cam_best_thres": None, "cam_best_miou": None}
    return {"cam_best_thres": thres, "cam_best_miou": eval_cam["cam_miou_sweep"][f"{thres:g}"]}


def write_report(out: Path, results: dict, timings: dict) -> Path:
    fs = results["first_stage"]
    lines = [
        "# BECO demo on the synthetic data",
        "",
        f"Seeds: first stage {results['first_stage_seed']}, second stage {results['second_stage_seed']}; "
        f"data: {results['data']['train']} train / {results['data']['val']} val images of "
        f"{results['data']['size'][0]}×{results['data']['size'][1]} px, {results['data']['classes']} classes. "
        "Every number below was measured by this run.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| CAM mIoU, train list (threshold {fs['cam_eval_thres']}) | {pct(fs['cam_miou'])} |",
        *([f"| CAM mIoU at the sweep's best threshold {fs['cam_best_thres']} (picked with the ground truth) | "
           f"{pct(fs['cam_best_miou'])} |"] if fs.get("cam_best_thres") is not None else []),
        f"| pseudo-label mIoU, train list (IRN random walk) | {pct(fs['pseudo_label_miou'])} |",
        f"| confidence mask: share of pixels kept | {pct(fs['mask_kept_fraction'])} |",
        f"| confidence mask: pseudo-label precision on kept / dropped pixels | "
        f"{pct(fs['mask_kept_precision'])} / {pct(fs['mask_unkept_precision'])} |",
        f"| pseudo-label error rate within {fs['errors']['radius_px']:g} px of a true boundary / farther | "
        f"{pct(fs['errors']['error_rate_near'])} / {pct(fs['errors']['error_rate_far'])} |",
        f"| share of pseudo-label errors near a boundary / dropped by the mask | "
        f"{pct(fs['errors']['errors_near_share'])} / {pct(fs['errors']['errors_dropped_share'])} |",
        f"| CE baseline, val mIoU (no CRF / CRF) | {pct(results['baseline']['no_crf'])} / "
        f"{pct(results['baseline']['crf'])} |",
        f"| BECO, val mIoU (no CRF / CRF) | {pct(results['beco']['no_crf'])} / {pct(results['beco']['crf'])} |",
        *([f"| BECO, each net alone (no CRF, from beco/results.md) | {pct(results['beco']['card'].get('net1'))} / "
           f"{pct(results['beco']['card'].get('net2'))} |"] if results["beco"].get("card") else []),
        f"| best val mIoU during training (labels resized to the val size): baseline / BECO | "
        f"{pct(results['baseline']['best_during_training'])} / {pct(results['beco']['best_during_training'])} |",
        "",
        "val mIoU is measured at the original resolution by test.py, from the best checkpoint of each run "
        "(picked on val, as the reference does); each run's results card (`beco/results.md`, "
        "`baseline/results.md`) has the per-class table.",
        "",
        "| stage | wall time (s) |",
        "|---|---|",
    ]
    lines += [f"| {s} | {timings[s]:.1f} |" for s in STAGES if s in timings]
    lines.append(f"| total | {sum(timings.get(s, 0.0) for s in STAGES):.1f} |")
    lines += ["", f"Peak resident memory of any one stage process: {results['peak_rss_mb']:.0f} MB.", "",
              "![val mIoU per epoch](curves.png)", "", "![samples](samples.png)", ""]
    return save_text(out / "results.md", "\n".join(lines))


# ----------------------------------------------------------------------------- several seeds

# The numbers --seeds aggregates: (row label, path into a seed's results.json).
AGGREGATED = (
    ("CAM mIoU, train list", ("first_stage", "cam_miou")),
    ("CAM mIoU at the sweep's best threshold", ("first_stage", "cam_best_miou")),
    ("pseudo-label mIoU, train list", ("first_stage", "pseudo_label_miou")),
    ("confidence mask: share of pixels kept", ("first_stage", "mask_kept_fraction")),
    ("confidence mask: label precision on kept pixels", ("first_stage", "mask_kept_precision")),
    ("confidence mask: label precision on dropped pixels", ("first_stage", "mask_unkept_precision")),
    ("CE baseline, val mIoU, no CRF", ("baseline", "no_crf")),
    ("CE baseline, val mIoU, CRF", ("baseline", "crf")),
    ("BECO, val mIoU, no CRF", ("beco", "no_crf")),
    ("BECO, val mIoU, CRF", ("beco", "crf")),
    ("BECO net 1 alone, no CRF", ("beco", "card", "net1")),
    ("BECO net 2 alone, no CRF", ("beco", "card", "net2")),
    ("best val mIoU during training, baseline", ("baseline", "best_during_training")),
    ("best val mIoU during training, BECO", ("beco", "best_during_training")),
)
PAIRED = (("no CRF", "no_crf"), ("CRF", "crf"), ("best val mIoU during training", "best_during_training"))


def _at(d: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean ± std over seeds of every AGGREGATED number, and BECO - baseline paired by seed."""
    rows = {}
    for label, path in AGGREGATED:
        values = {s: v for s, r in per_seed.items() if (v := _at(r, path)) is not None}
        if values:
            rows[label] = summary(list(values.values()))
    diffs = {label: paired({s: r["beco"][key] for s, r in per_seed.items()},
                           {s: r["baseline"][key] for s, r in per_seed.items()}) for label, key in PAIRED}
    total = {s: sum(r["timings"].get(k, 0.0) for k in STAGES) for s, r in per_seed.items()}
    return {"seeds": list(per_seed), "numbers": rows, "beco_minus_baseline": diffs, "seconds": total}


def write_seeds_report(out: Path, agg: dict, per_seed: dict[int, dict]) -> Path:
    seeds = agg["seeds"]
    data = next(iter(per_seed.values()))["data"]
    lines = ["# BECO demo on the synthetic data, several seeds", "",
             f"Seeds {seeds} (each seeds both stages: first-stage training, second-stage initialisation and data "
             f"order); data: {data['train']} train / {data['val']} val images. Each seed's own report: "
             + ", ".join(f"[seed{s}/results.md](seed{s}/results.md)" for s in seeds) + ".", "",
             "| quantity | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for label, row in agg["numbers"].items():
        lines.append(f"| {label} | {pct(row['mean'])} ± {pct(row['std'])} | "
                     + " | ".join(pct(v) for v in row["values"]) + " |")
    lines += ["", "BECO − CE baseline, paired by seed (points of val mIoU):", "",
              "| val mIoU | mean ± std | 95 % interval of the mean | BECO ahead in | " +
              " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|---|---|" + "---|" * len(seeds)]
    for label, d in agg["beco_minus_baseline"].items():
        if d is None:
            continue
        ci = "—" if d["ci95"] is None else f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
        lines.append(f"| {label} | {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} | {ci} | {d['wins']} of {d['n']} | "
                     + " | ".join(f"{100 * v:+.1f}" for v in d["values"]) + " |")
    lines += ["", "An interval that contains 0 means these seeds cannot tell the two methods apart.", "",
              "Wall time per seed: " + ", ".join(f"seed {s} {agg['seconds'][s]:.0f} s" for s in seeds) + ".", "",
              "![val mIoU per epoch, mean ± std over seeds](curves.png)", ""]
    return save_text(out / "results.md", "\n".join(lines))


def run_seeds(args: argparse.Namespace) -> int:
    out = prepare_out(args, {"seeds": args.seeds})
    per_seed = {}
    for k, seed in enumerate(args.seeds):
        say(f"seed {seed} ({k + 1} of {len(args.seeds)}) -> {out / f'seed{seed}'}")
        one = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None, "fresh": False,
                                    "out": out / f"seed{seed}"})
        per_seed[seed] = run_one(one)
    agg = aggregate(per_seed)
    save_json(out / "results.json", {**agg, "per_seed": {str(s): r for s, r in per_seed.items()}})
    plot_curves(out, {tag: [{r['epoch']: r['miou'] for r in res[tag]['val_log']} for res in per_seed.values()]
                      for tag, *_ in CURVES})
    write_seeds_report(out, agg, per_seed)
    print((out / "results.md").read_text())
    say(f"done: {out / 'results.md'}, {out / 'curves.png'}")
    return 0


# ----------------------------------------------------------------------------- main


# Everything the demo writes under --out (what --fresh may delete; nothing else there is touched).
DEMO_OUTPUTS = ("first_stage", "pseudo_labels", *RUNS, "seed*", "results.json", "results.md", "timings.json",
                "curves.png", "samples.png", "peak_rss.json", "demo_settings.json")


def prepare_out(args: argparse.Namespace, settings: dict) -> Path:
    """<out> for a demo with ``settings`` (utils/provenance.py): reused by the same demo (a rerun
    resumes), refused when it holds a demo with other settings or files the demo did not record
    making; --fresh deletes the demo's own outputs, and only after the configs have loaded."""
    for path in (args.beco_config, args.baseline_config):
        load_config(path)
    first_stage_settings(args.first_stage_config)
    settings = {**settings, **({"dataset": args.dataset} if args.dataset != "voc" else {}),
                "beco_config": str(args.beco_config), "baseline_config": str(args.baseline_config),
                "first_stage_config": str(args.first_stage_config)}
    record = provenance.make_record("tools/demo.py", {}, settings)
    legacy = args.out / "demo_settings.json"  # the record of demos made before utils/provenance.py
    if legacy.is_file() and provenance.read_record(args.out / provenance.RECORD_NAME) is None:
        save_json(args.out / provenance.RECORD_NAME,
                  provenance.make_record("tools/demo.py", {}, json.loads(legacy.read_text())))
    plan = provenance.plan(args.out, record, DEMO_OUTPUTS, overwrite=args.fresh, overwrite_flag="--fresh")
    if plan.action == "replace":
        say(f"--fresh: removing the demo's outputs in {args.out}")
    provenance.commit(plan)
    return args.out


def card_nets(run_dir: Path) -> dict[str, float]:
    """Each net alone and averaged, single scale without CRF, from the run's results card."""
    rows = card.read_card(run_dir).get("rows", {})
    return {net: rows[key]["miou"] for net in ("net1", "net2", card.MEAN)
            if (key := card.row_key(net, "single", False, "original")) in rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    return exit_status(lambda: _main(args), "demo: error")


def _main(args: argparse.Namespace) -> int:
    if args.seeds is not None:
        return run_seeds(args)
    run_one(args)
    out = args.out
    print((out / "results.md").read_text())
    say(f"done: {out / 'results.md'}, {out / 'curves.png'}, {out / 'samples.png'}")
    return 0


def run_one(args: argparse.Namespace) -> dict:
    """The whole pipeline into args.out with args.seed; returns what results.json holds."""
    out = prepare_out(args, {"seed": args.seed})

    cfg_beco = load_config(args.beco_config)
    cfg_base = load_config(args.baseline_config)
    fs_settings = first_stage_settings(args.first_stage_config)
    timings = Timings(out / "timings.json")
    work, export = out / "first_stage", out / "pseudo_labels"
    overrides = second_stage_overrides(out, export, args.seed)

    def stage(name: str, fn, *a) -> Any:
        say(f"stage {STAGES.index(name) + 1}/{len(STAGES)}: {name}")
        start = time.perf_counter()
        result = fn(*a)
        seconds, skipped = time.perf_counter() - start, result == "skipped"
        if skipped and name in timings.data:
            say(f"stage {name}: already done, skipped (its recorded time is kept)")
            return result
        # A stage done outside this folder (the data set of an earlier --out or --fresh run)
        # costs this run the time to find it done.
        timings.record(name, seconds)
        say(f"stage {name}: already done, reused (no recorded time, {seconds:.1f} s counted)" if skipped
            else f"stage {name} done ({seconds:.1f} s)")
        return result

    stage("data", stage_data, cfg_beco)
    data = json.loads((Path(cfg_beco.data.root) / dataset_entry(cfg_beco.data.dataset).synthetic_summary).read_text())
    stage("first_stage", stage_first_stage, cfg_beco, args.first_stage_config, work, export, args.seed)
    configs = {"beco": (args.beco_config, cfg_beco), "baseline": (args.baseline_config, cfg_base)}
    for tag, (path, cfg) in configs.items():
        stage(RUNS[tag], stage_train, path, tag, cfg, out, overrides)

    def test_both() -> dict | str:
        if all(_tested(out / tag) for tag in RUNS):  # scores newer than the checkpoints
            return "skipped"
        for tag, (path, cfg) in configs.items():
            stage_test(path, tag, cfg, out, overrides)
        return {}
    stage("test", test_both)
    tests = {tag: {key: json.loads((out / tag / name).read_text())["miou"] for key, name in SCORES.items()}
             for tag in RUNS}

    steps = json.loads((work / "summary.json").read_text())["steps"]
    eval_cam, eval_sem, gen_mask = (steps[s]["metrics"] for s in ("eval_cam", "eval_sem_seg", "gen_mask"))
    results = {
        "seed": args.seed,  # None: each stage's config seed (below)
        "first_stage_seed": args.seed if args.seed is not None else fs_settings.seed,
        "second_stage_seed": args.seed if args.seed is not None else cfg_beco.train.seed,
        "data": {k: data["settings"][k] for k in ("train", "val", "size", "classes")},
        "first_stage": {"cam_miou": eval_cam["cam_miou"], "cam_eval_thres": eval_cam["cam_eval_thres"],
                        **best_swept_cams(eval_cam, eval_sem),
                        "pseudo_label_miou": eval_sem["sem_seg_miou"],
                        "mask_kept_fraction": gen_mask["kept_fraction"],
                        "mask_kept_precision": gen_mask["kept_precision"],
                        "mask_unkept_precision": gen_mask["unkept_precision"],
                        "errors": label_error_profile(cfg_beco, export)},
        "peak_rss_mb": peak_rss_mb(out / "peak_rss.json"),
    }
    for tag in ("beco", "baseline"):
        log = read_jsonl(out / tag / "val_log.jsonl")
        results[tag] = {**tests[tag], "best_during_training": max(r["miou"] for r in log), "card": card_nets(out / tag),
                        "val_log": [{"epoch": r["epoch"], "miou": r["miou"]} for r in log]}

    def pictures() -> dict:
        plot_curves(out)
        plot_samples(out, cfg_beco, cfg_base, export, args.samples)
        return {}
    stage("report", pictures)
    save_json(out / "results.json", {**results, "timings": timings.data})
    write_report(out, results, timings.data)
    return {**results, "timings": timings.data}


if __name__ == "__main__":
    sys.exit(main())

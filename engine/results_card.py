"""The results card: ``<run>/results.json`` and ``results.md``, everything a run's tests measured.

``main.py --test`` adds a row per net (each net alone, and both averaged) and inference setting
(single scale; multi-scale with flip) without CRF, at the original resolution, plus the
reference's 512x512 figure; ``test.py`` adds the row of the maps it read, with or without CRF.
Rows are keyed by (net, inference, crf, resolution): a rerun replaces its own rows and keeps
the others. The card belongs to one checkpoint (by SHA-256): a test of another checkpoint in the
same folder moves the old card to ``results.previous.*`` instead of mixing the two.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from datasets.build import dataset_entry
from datasets.readers import read_label, read_mask
from datasets.handoff import mask_precision, precision_counts
from datasets.label_import import QUALITY_JSON, QUALITY_MD
from engine.checkpoint import BEST, LATEST
from utils import provenance
from utils.io import read_jsonl, save_json, save_text
from utils.metrics import confusion_matrix, segmentation_scores
from utils.runtime import cpu_info

CARD_JSON = "results.json"
CARD_MD = "results.md"
MEAN = "mean"  # the key of both nets averaged; a one-net run has only "net1"
INFERENCE_ORDER = ("single", "flip", "msc", "msc+flip")
RUNS_KEPT = 20  # the card lists the latest test commands that wrote to it


def inference_name(multi_scale: bool, flip: bool) -> str:
    return next(n for n in INFERENCE_ORDER if inference_setting(n) == (bool(multi_scale), bool(flip)))


def inference_setting(name: str) -> tuple[bool, bool]:
    """(multi_scale, flip) of an inference name."""
    return {"single": (False, False), "flip": (False, True), "msc": (True, False), "msc+flip": (True, True)}[name]


def net_names(num_nets: int) -> list[str]:
    return [f"net{k + 1}" for k in range(num_nets)] + ([MEAN] if num_nets > 1 else [])


def saved_net_name(num_nets: int) -> str:
    """The row the saved maps belong to: both nets averaged, or the single net."""
    return MEAN if num_nets > 1 else "net1"


def row_key(net: str, inference: str, crf: bool, resolution: str) -> str:
    return f"{net}|{inference}|{'crf' if crf else 'no_crf'}|{resolution}"


def hardware() -> dict[str, Any]:
    """What the numbers were computed on: float results depend on it (docs/reproducibility.md)."""
    cpu = cpu_info()
    info: dict[str, Any] = {"host": platform.node(), "cpu": cpu["cpu_model"] or platform.machine(),
                            "cpu_flags": cpu["cpu_flags"], "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "python": sys.version.split()[0], "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def checkpoint_choice(path: Path) -> str:
    return {BEST: "best on val (as the reference)", LATEST: "last (the latest resumable checkpoint)"}.get(
        path.name, "as given (--ckpt)")


def best_epoch(run_dir: Path) -> dict[str, Any] | None:
    """The epoch best_ckpt.pth was saved at, from the run's val_log.jsonl (first maximum, as saved)."""
    log = [r for r in read_jsonl(run_dir / "val_log.jsonl") if r.get("miou") is not None]
    if not log:
        return None
    best = max(log, key=lambda r: r["miou"])  # max keeps the first of equal values
    return {"epoch": best["epoch"], "val_miou_during_training": best["miou"], "epochs_logged": log[-1]["epoch"]}


def checkpoint_entry(path: Path, run_dir: Path) -> dict[str, Any]:
    """Name, path, size, SHA-256 and how it was chosen; the hash is reused from the card when the
    file's size and mtime are unchanged (a two-net R101 checkpoint is 0.7 GB)."""
    path = Path(path).resolve()
    stat = path.stat()
    entry = {"name": path.name, "path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "choice": checkpoint_choice(path)}
    old = read_card(run_dir).get("checkpoint", {})
    same = all(old.get(k) == entry[k] for k in ("path", "bytes", "mtime_ns")) and old.get("sha256")
    entry["sha256"] = old["sha256"] if same else provenance.sha256(path)
    if path.name == BEST and (epoch := best_epoch(path.parent)):
        entry.update(epoch)
    return entry


def read_card(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CARD_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:  # a hand-edited or foreign file: kept aside, never overwritten
        provenance.set_aside(path)  # results.N.json
        return {}


def make_row(scores: dict, net: str, inference: str, crf: bool, resolution: str, *, split: str,
             num_images: int, source: str, note: str | None = None) -> dict[str, Any]:
    return {"net": net, "inference": inference, "crf": crf, "resolution": resolution, "split": split,
            "num_images": num_images, "source": source, "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
            "mean_acc": scores["mean_acc"], "mean_precision": scores["mean_precision"], "iou": scores["iou"],
            **({"note": note} if note else {})}


def update_card(run_dir: Path, checkpoint: dict[str, Any], rows: list[dict[str, Any]], *, class_names: list[str],
                config: dict[str, Any], tool: str, seconds: float, scales: list[float] | None = None,
                pseudo_labels: dict[str, Any] | None = None) -> Path:
    """Merge ``rows`` into the run's card (one checkpoint per card) and rewrite both files atomically."""
    run_dir = Path(run_dir)
    card = read_card(run_dir)
    if card and card.get("checkpoint", {}).get("sha256") != checkpoint["sha256"]:
        provenance.set_aside(run_dir / CARD_JSON, run_dir / CARD_MD)  # results.1.json, results.1.md, ...
        card = {}
    card["checkpoint"] = checkpoint
    card["class_names"] = class_names
    card["config"] = config
    card["rows"] = {**card.get("rows", {}), **{row_key(r["net"], r["inference"], r["crf"], r["resolution"]): r
                                                for r in rows}}
    if scales is not None:
        card["msc_scales"] = scales
    if pseudo_labels is not None:
        card["pseudo_labels"] = pseudo_labels
    card.pop("label_quality", None)  # looked up again: the labels may have been imported since
    if (report := label_quality_report(config.get("data", {}))) is not None:
        card["label_quality"] = report
    run = {"tool": tool, "argv": sys.argv, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
           "seconds": round(seconds, 1), "hardware": hardware()}
    card["runs"] = (card.get("runs", []) + [run])[-RUNS_KEPT:]
    save_json(run_dir / CARD_JSON, card)
    save_text(run_dir / CARD_MD, render(card))
    return run_dir / CARD_JSON


def label_quality_report(data: dict[str, Any]) -> dict[str, Any] | None:
    """The quality report tools/import_labels.py wrote beside the run's pseudo-labels
    (``<data.root>/<data.pseudo_label_dir>/label_quality.md``; an absolute ``pseudo_label_dir`` stands
    alone): its path and its json's mIoU and kept share, fractions (None where the json lacks them or
    cannot be read); None without a report."""
    if not data.get("pseudo_label_dir"):
        return None
    folder = Path(data.get("root") or ".") / data["pseudo_label_dir"]
    md = folder / QUALITY_MD
    if not md.is_file():
        return None
    try:
        numbers = json.loads((folder / QUALITY_JSON).read_text())
    except (OSError, ValueError):
        numbers = {}
    numbers = numbers if isinstance(numbers, dict) else {}
    out: dict[str, Any] = {"report": str(md.resolve())}
    for key in ("miou", "kept_share"):
        value = numbers.get(key)
        out[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def pseudo_label_quality(cfg: Any, run_dir: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """The training labels (data.pseudo_label_dir) and masks against the training split's ground
    truth, when it has one (the synthetic sets, VOC's train_aug): mIoU, pixel accuracy, the mask's
    kept share and the labels' precision on kept and dropped pixels. Pseudo-label void (255) is
    left out and counted apart. Reused from the card when the folders and ids are unchanged.

    In a process group every rank calls it and reads ids rank, rank + world_size, ...; the
    counts are summed, so every rank returns the same result (COCO's 83,000 labels read by
    rank 0 alone outlasted the others' wait at the next collective)."""
    d = cfg.data
    entry = dataset_entry(d.dataset)
    split = entry.train_split(d)
    files = entry.files(d, split)
    label_dir, mask_dir = Path(d.root) / d.pseudo_label_dir, Path(d.root) / d.mask_dir
    where = {"label_dir": str(label_dir.resolve()), "mask_dir": str(mask_dir.resolve()), "split": split,
             "num_images": len(files.ids)}
    cached = read_card(run_dir).get("pseudo_labels", {})
    if cached and all(cached.get(k) == v for k, v in where.items()):
        return cached
    if not label_dir.is_dir():
        return {**where, "miou": None, "reason": f"pseudo-label folder {label_dir} not found"}
    if files.gt_dir is None:
        return {**where, "miou": None, "reason": f"the '{split}' split has no ground truth for every id"}
    mine = _quality_counts(entry, files, split, files.ids[rank::world_size], label_dir, mask_dir,
                           d.num_classes, show=rank == 0)
    parts = [mine]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    reasons = [part["reason"] for part in parts if part["reason"]]
    if reasons:
        return {**where, "miou": None, "reason": reasons[0]}
    return _quality_result(where, parts, mask_dir.is_dir())


def _quality_counts(entry: Any, files: Any, split: str, ids: list[str], label_dir: Path, mask_dir: Path, n: int,
                    show: bool) -> dict[str, Any]:
    """``pseudo_label_quality``'s sums over ``ids``: the confusion matrix (as nested lists, to
    travel between ranks) and the pixel counts; ``reason`` says why nothing can be scored."""
    out: dict[str, Any] = {"reason": None}
    if not all(files.gt(i).is_file() for i in ids):
        out["reason"] = f"the '{split}' split has no ground truth for every id"
        return out
    conf = torch.zeros(n, n, dtype=torch.long)
    counts = dict(kept_valid=0, unkept_valid=0, kept_correct=0, unkept_correct=0, void=0, valid=0)
    masks = mask_dir.is_dir()
    for i in tqdm(ids, desc="pseudo-label quality", leave=False, dynamic_ncols=True, disable=not show):
        gt = np.asarray(read_label(files.gt(i), i, n, "ground truth", entry.gt_ignore_index))
        pl = np.asarray(read_label(label_dir / f"{i}.png", i, n, "pseudo-label"))
        if gt.shape != pl.shape:
            out["reason"] = f"id '{i}': pseudo-label {pl.shape} and ground truth {gt.shape} differ in size"
            return out
        ok = gt != (entry.gt_ignore_index if entry.gt_ignore_index is not None else -1)
        labelled = ok & (pl != 255)
        counts["void"] += int((ok & (pl == 255)).sum())
        counts["valid"] += int(ok.sum())
        target = np.where(labelled, gt, 255).astype(np.int64)
        conf += confusion_matrix(torch.from_numpy(np.where(labelled, pl, 0).astype(np.int64)),
                                 torch.from_numpy(target), n)
        if masks:
            for key, v in precision_counts(pl, np.asarray(read_mask(mask_dir / f"{i}.png", i)), gt, labelled).items():
                counts[key] += v
    return {**out, "conf": conf.tolist(), **counts}


def _quality_result(where: dict[str, Any], parts: list[dict[str, Any]], masks: bool) -> dict[str, Any]:
    """The card's pseudo-label entry from the summed ``_quality_counts`` of every shard."""
    conf = sum(torch.tensor(part["conf"], dtype=torch.long) for part in parts)
    c = {k: sum(part[k] for part in parts) for k in ("kept_valid", "unkept_valid", "kept_correct", "unkept_correct",
                                                   "void", "valid")}
    scores = segmentation_scores(conf)
    out = {**where, "miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "iou": scores["iou"],
           "void_fraction": c["void"] / max(c["valid"], 1)}
    if masks:
        precision = mask_precision(c, empty=0.0)
        out.update(mask_kept_fraction=c["kept_valid"] / max(c["kept_valid"] + c["unkept_valid"], 1),
                   kept_precision=precision["kept_precision"], dropped_precision=precision["unkept_precision"])
    return out


# ----------------------------------------------------------------------------- markdown

def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _columns(rows: dict[str, dict]) -> list[tuple[str, bool]]:
    """(inference, crf) pairs of the original-resolution rows, single scale first, CRF after."""
    have = {(r["inference"], r["crf"]) for r in rows.values() if r["resolution"] == "original"}
    # Single scale and multi-scale + flip always, so every card has the same layout (— where not run).
    base = [i for i in INFERENCE_ORDER if i in ("single", "msc+flip") or any(h[0] == i for h in have)]
    return [(i, crf) for i in base for crf in (False, True)]


def _label(inference: str, crf: bool) -> str:
    return {"single": "single scale", "flip": "flip", "msc": "multi-scale", "msc+flip": "multi-scale + flip"}[
        inference] + (" + CRF" if crf else "")


def _net_label(net: str) -> str:
    return "both averaged" if net == MEAN else f"net {net[3:]} alone"


def render(card: dict[str, Any]) -> str:
    rows, ck = card["rows"], card["checkpoint"]
    nets = [n for n in (*sorted({r["net"] for r in rows.values()} - {MEAN}), MEAN) if any(r["net"] == n for r in rows.values())]
    cols = _columns(rows)
    first = next(iter(rows.values()))
    data = card["config"].get("data", {})
    epoch = (f", epoch {ck['epoch']} of {ck['epochs_logged']} (val mIoU during training {_pct(ck['val_miou_during_training'])})"
             if "epoch" in ck else "")
    lines = [f"# Results card: {Path(ck['path']).parent.name}", "",
             f"- checkpoint: `{ck['name']}`, {ck['choice']}{epoch}; SHA-256 `{ck['sha256'][:16]}…`",
             f"- data: {data.get('dataset', '?')} `{data.get('root', '?')}`, split `{first['split']}`, "
             f"{first['num_images']} images; model {card['config'].get('model', {}).get('name', '?')}, "
             f"method {card['config'].get('method', {}).get('name', '?')}",
             *([f"- multi-scale: scales {card['msc_scales']} and 1.0, max over scales"] if card.get("msc_scales") else []),
             "", "## mIoU (%), original resolution", "",
             "| net | " + " | ".join(_label(i, c) for i, c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for net in nets:
        cells = [_pct(rows.get(row_key(net, i, c, "original"), {}).get("miou")) for i, c in cols]
        label = _net_label(net) if len(nets) > 1 else "the one net"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "— : not measured. Rows without CRF come from `main.py --test` (its `test.card_inference` settings "
              "for every net); CRF needs saved maps, which are of the averaged nets (or the one net): run "
              "`main.py --test test.multi_scale=true test.flip=true` and `test.py --crf` on its "
              "`logits_msc_flip` folder to fill that column."]
    other = [r for r in rows.values() if r["resolution"] != "original"]
    if other:
        lines += ["", "Resized ground truth (the reference's \"Final test results\", labels resized to the val size): "
                  + "; ".join(f"{_net_label(r['net'])}, {_label(r['inference'], r['crf'])} at {r['resolution']}: "
                              f"{_pct(r['miou'])}" for r in other)]
    lines += ["", "## Per-class IoU (%), original resolution", ""]
    shown = [(net, i, c) for net in nets for i, c in cols if row_key(net, i, c, "original") in rows
             and net == (MEAN if MEAN in nets else nets[0])]
    lines += ["| class | " + " | ".join(_label(i, c) for _, i, c in shown) + " |", "|---|" + "---|" * len(shown)]
    for k, name in enumerate(card["class_names"]):
        cells = [_pct(rows[row_key(net, i, c, "original")]["iou"][k]) for net, i, c in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pl = card.get("pseudo_labels")
    lines += ["", "## Pseudo-labels (training split against its ground truth)", ""]
    if lq := card.get("label_quality"):
        share = {k: "—" if lq[k] is None else f"{_pct(lq[k])} %" for k in ("miou", "kept_share")}
        lines.append(f"- Pseudo-labels: `{lq['report']}` (mIoU {share['miou']}, kept share {share['kept_share']})")
    if pl and pl.get("miou") is not None:
        lines += [f"- `{pl['label_dir']}` on {pl['num_images']} images of `{pl['split']}`: mIoU {_pct(pl['miou'])}, "
                  f"pixel accuracy {_pct(pl['pixel_acc'])}"]
        if pl.get("mask_kept_fraction") is not None:
            lines.append(f"- confidence mask `{pl['mask_dir']}`: {_pct(pl['mask_kept_fraction'])} % of pixels kept; "
                         f"label precision on kept / dropped pixels {_pct(pl['kept_precision'])} / "
                         f"{_pct(pl['dropped_precision'])}")
    else:
        lines.append(f"- not measured: {pl.get('reason') if pl else 'no pseudo-label folder in the config'}")
    lines += ["", "## Runs", "", "| finished | tool | seconds | hardware |", "|---|---|---|---|"]
    for r in card["runs"]:
        hw = r["hardware"]
        where = ", ".join(hw.get("gpus", [])) or f"{hw['cpu']} ({hw['cores']} cores, {hw['torch_threads']} threads)"
        lines.append(f"| {r['finished']} | `{r['tool']}` | {r['seconds']} | {where}; torch {hw['torch']} |")
    lines += ["", "The resolved config is in `results.json` (`config`) and beside the maps (`config.yaml`).", ""]
    return "\n".join(lines)

"""``main.py --test``: the two nets' averaged score maps over a split, saved for test.py (spec §7),
and the metrics, at 512x512 (the reference's "Final test results") and at the original resolution.

For every id the ``pre_logits`` of the two nets (at the segmenter's head resolution,
stride 4 or 8 by segmenter) are averaged (optionally also over a horizontal flip, and
maxed over scales) and saved as ``<run>/<folder>/<id>.npy`` (``test.logits_format`` dense,
the reference's) or ``<id>.npz`` (compact: only the classes that matter, utils/score_maps.py);
``test.save_logits`` false saves nothing. The original-resolution metrics upsample the saved
map exactly as ``test.py`` does without CRF, so evaluation without CRF needs no maps at all.
Ranks started by torchrun each take a shard of the ids (every id exactly once) and their
confusion matrices are summed.

A rerun resumes: an id whose map is already saved is not run through the nets again, its
saved map is read back for the metrics (``--overwrite`` recomputes and rewrites).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine import checkpoint as ckpt_io
from engine import results_card as card
from engine.evaluate import ShardSampler
from utils.config import Config, ConfigError, to_dict, to_yaml
from utils.errors import CheckpointError, RunError
from utils import provenance
from utils.io import save_json
from utils.logs import log, setup_logging
from utils.runtime import configure_backends, make_autocast, net_input, net_layout


CONFIG_NAME = "config.yaml"  # test.py finds the data set through this file beside the logits folder


def logits_folder_name(cfg: Config) -> str:
    """``logits``, ``logits_msc`` with multi-scale (the reference's names), ``_flip`` added with flip,
    so maps made differently never share a folder (a rerun would otherwise mix them)."""
    return ("logits" + ("_msc" if cfg.test.multi_scale else "") + ("_flip" if cfg.test.flip else "")
            + ("_compact" if cfg.test.logits_format == "compact" else ""))


def test_run_dir(cfg: Config, ckpt: str | None) -> Path:
    """``<path_base>/<tag><run_id>`` when a tag or run id is given (the reference's
    ``--logging_tag``), else the checkpoint's folder."""
    name = cfg.logging.tag + (cfg.logging.run_id or "")
    if name:
        return Path(cfg.logging.path_base) / name
    if ckpt:
        return Path(ckpt).resolve().parent
    raise ConfigError("--test needs --ckpt, or --logging_tag / --run_id naming a run folder with "
                      f"{ckpt_io.BEST}")


def resolve_checkpoint(cfg: Config, ckpt: str | None, run_dir: Path) -> Path:
    path = Path(ckpt) if ckpt else run_dir / ckpt_io.BEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + ("" if ckpt else " (pass --ckpt)"))
    return path


def build_test_nets(cfg: Config, device: torch.device) -> list[nn.Module]:
    """The run's nets in eval mode, in the training's memory layout (``train.channels_last``),
    ImageNet initialisation skipped (the checkpoint holds every weight)."""
    from engine.beco import num_nets
    from models import build_model
    return [net_layout(build_model(cfg.model, cfg.data.num_classes, pretrained=False).to(device), cfg).eval()
            for _ in range(num_nets(cfg))]


def load_test_nets(cfg: Config, path: Path, device: torch.device, trust: bool = False) -> list[nn.Module]:
    """Nets from ``best_ckpt.pth``, a resumable checkpoint, or the reference's released file
    (``{"net_state_dict": {"network1", "network2"}}``, ``module.`` prefixes allowed): strictly.
    Weights-only loading unless ``trust`` (--trust-checkpoint); a file that is not a checkpoint
    dict is a CheckpointError naming it and what it holds."""
    nets = build_test_nets(cfg, device)
    state = ckpt_io.load(path, trust=trust)
    ckpt_io.load_nets(state, nets, str(path))
    return nets


# ----------------------------------------------------------------------------- forward passes

def _mean(outs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the nets, float32, summed in net order (engine.evaluate.average_outputs' arithmetic)."""
    total = outs[0].float()
    for o in outs[1:]:
        total = total + o.float()
    return total / len(outs)


@torch.no_grad()
def predict_variants(nets: list[nn.Module], images: torch.Tensor, cfg: Config, settings: list[tuple[bool, bool]],
                     per_net: bool = False) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(head-resolution map, full-size logits) for every (multi_scale, flip) of ``settings``, keyed by
    (net, inference name) (engine.results_card): both nets averaged (``mean``; a one-net run: ``net1``),
    and with ``per_net`` each net alone too. Every forward pass runs once, whatever the settings share.

    Multi-scale (spec §7): the input is also resized by every ``test.scales``, each head-resolution
    map is resized to the base one's size, and the pixel-wise maximum over the base and the scaled
    maps is kept; its full-size logits are that map upsampled. Without multi-scale the full-size
    logits are the nets' own, as in validation (§6). Flip averages each scale's map with the
    flipped input's, flipped back.
    """
    align = cfg.model.align_corners
    need_flip = any(f for _, f in settings)
    scales = cfg.test.scales if any(m for m, _ in settings) else []
    h, w = images.shape[-2:]
    # views[(scale, flipped)] = per-net (pre, full); flipped outputs are flipped back.
    views: dict[tuple[float | None, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for scale in [None, *scales]:
        x = images if scale is None else F.interpolate(images, size=(round(h * scale), round(w * scale)),
                                                       mode="bilinear", align_corners=align)
        for flipped in (False, True) if need_flip else (False,):
            view_input = net_input(x.flip(-1) if flipped else x, cfg)  # the nets' memory layout
            outs = [net(view_input) for net in nets]
            # Scaled inputs' full-size logits are never used: not kept (they are the largest tensors).
            views[(scale, flipped)] = [tuple(None if (k == "logits" and scale is not None)
                                             else o[k].flip(-1) if flipped else o[k] for k in ("pre_logits", "logits"))
                                       for o in outs]
    groups = {card.saved_net_name(len(nets)): list(range(len(nets)))}
    if per_net and len(nets) > 1:
        groups.update({name: [k] for k, name in enumerate(card.net_names(len(nets))[:-1])})

    def view(members: list[int], scale: float | None, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        def mean(j: int, flipped: bool) -> torch.Tensor | None:
            return None if scale is not None and j == 1 else _mean([views[(scale, flipped)][k][j] for k in members])
        pre, full = mean(0, False), mean(1, False)
        if flip:
            pre = (pre + mean(0, True)) / 2
            full = None if full is None else (full + mean(1, True)) / 2
        return pre, full

    result = {}
    for name, members in groups.items():
        for msc, flip in settings:
            pre, full = view(members, None, flip)
            if msc:
                best = pre
                for scale in cfg.test.scales:
                    pre_s, _ = view(members, scale, flip)
                    best = torch.maximum(best, F.interpolate(pre_s, size=pre.shape[-2:], mode="bilinear",
                                                             align_corners=align))
                pre, full = best, F.interpolate(best, size=(h, w), mode="bilinear", align_corners=align)
            result[(name, card.inference_name(msc, flip))] = (pre, full)
    return result


@torch.no_grad()
def predict_maps(nets: list[nn.Module], images: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(head-resolution map to save, full-size logits for the metrics) of a normalised batch: the
    nets averaged, with the config's multi-scale and flip (``predict_variants``)."""
    key = (card.saved_net_name(len(nets)), card.inference_name(cfg.test.multi_scale, cfg.test.flip))
    return predict_variants(nets, images, cfg, [(cfg.test.multi_scale, cfg.test.flip)])[key]


# ----------------------------------------------------------------------------- saved maps

def load_saved_map(path: Path, item_id: str, cfg: Config) -> np.ndarray:
    """A saved map as dense (C, h, w) float32 logits, checked against the run's class count and
    storage type; a compact map's dropped classes get a logit no kept class falls below."""
    from utils.crf import REST_FLOOR
    from utils.score_maps import ScoreMapError, load_score_map, to_dense
    try:
        score = load_score_map(path, item_id, cfg.data.num_classes)
    except ScoreMapError as e:
        raise RunError(f"{e}; rerun with --overwrite") from None
    if cfg.test.logits_format == "dense" and np.load(path, mmap_mode="r").dtype != np.dtype(cfg.test.logits_dtype):
        raise RunError(f"saved map for id '{item_id}' is not {cfg.test.logits_dtype} (test.logits_dtype): "
                         f"{path}; rerun with --overwrite")
    return to_dense(score, REST_FLOOR)


TOOL = "main.py --test"
MAP_PATTERNS = ("*.npy", "*.npz")  # what run_test writes into its maps folder (and may delete)


def map_settings(cfg: Config) -> dict:
    """What the saved maps' bytes depend on besides the checkpoint (utils/provenance.py)."""
    return {"dataset": cfg.data.dataset, "split": cfg.test.split, "val_size": cfg.data.val_size,
            "num_classes": cfg.data.num_classes, "mean": cfg.data.mean, "std": cfg.data.std,
            "multi_scale": cfg.test.multi_scale, "scales": cfg.test.scales if cfg.test.multi_scale else None,
            "flip": cfg.test.flip, "logits_format": cfg.test.logits_format, "logits_dtype": cfg.test.logits_dtype,
            **({"compact_threshold": cfg.test.compact_threshold, "compact_max_classes": cfg.test.compact_max_classes}
               if cfg.test.logits_format == "compact" else {}),
            "model": to_dict(cfg.model)}


def map_record(cfg: Config, ckpt_path: Path) -> dict:
    return provenance.make_record(TOOL, {"checkpoint": provenance.file_input(ckpt_path)}, map_settings(cfg))


def save_run_config(run_dir: Path, cfg: Config) -> Path:
    """``<run>/config.yaml`` = this test's resolved config; a different one already there (the
    training run's, an earlier test's) is kept as ``config.1.yaml``, ``config.2.yaml``, ..."""
    return provenance.keep_numbered(run_dir / CONFIG_NAME, to_yaml(cfg))


def _full_resolution_confusion(maps: torch.Tensor, labels: list[torch.Tensor], num_classes: int,
                               align: bool) -> torch.Tensor:
    """Each head-resolution map upsampled to its image's size, arg-max, against the original
    ground truth: test.py's rule without CRF, computed in the test pass."""
    from utils.metrics import confusion_matrix
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=maps.device)
    for m, label in zip(maps, labels):
        label = label.to(maps.device, non_blocking=True)
        up = F.interpolate(m[None].float(), size=label.shape, mode="bilinear", align_corners=align)
        conf += confusion_matrix(up[0].argmax(0), label, num_classes)
    return conf


def run_test(cfg: Config, args: argparse.Namespace) -> dict:
    """Save every id's averaged map (unless ``test.save_logits`` is off) and report the metrics
    at 512x512 and at the original resolution; returns a summary."""
    configure_backends(cfg)  # cuDNN autotuning, TF32, --determ: before CUDA starts, as in training
    from datasets.build import dataset_entry
    from datasets.segmentation import EvalSet, collate_eval, loader_worker_init
    from utils.distributed import all_reduce_sum, barrier, init_distributed
    from utils.metrics import confusion_matrix, iou_table, segmentation_scores
    from utils.crf import REST_FLOOR
    from utils.score_maps import SUFFIX, bytes_bound, save_score_map, to_dense

    if (cfg.test.multi_scale or any("msc" in s for s in cfg.test.card_inference)) and not cfg.test.scales:
        raise ConfigError("config key 'test.scales': multi-scale testing (test.multi_scale or a multi-scale "
                          "test.card_inference entry) needs at least one scale")
    info = init_distributed(getattr(args, "gpu_id", None), cfg.dist.timeout_min)
    run_dir = test_run_dir(cfg, args.ckpt)
    ckpt_path = resolve_checkpoint(cfg, args.ckpt, run_dir)
    save = cfg.test.save_logits
    out_dir = run_dir / logits_folder_name(cfg)
    suffix = SUFFIX[cfg.test.logits_format]
    overwrite = bool(getattr(args, "overwrite", False))
    entry = dataset_entry(cfg.data.dataset)
    files = entry.files(cfg.data, cfg.test.split)
    ids = files.ids
    # Every rank decides before anything is written; the maps go (with --overwrite) only after
    # the data and the checkpoint have passed their checks below.
    maps_plan = provenance.plan(out_dir, map_record(cfg, ckpt_path), MAP_PATTERNS, overwrite=overwrite,
                                legacy="_settings.json") if save else None

    # Labels are read when the split has any ground truth (VOC's test split has none); then every
    # id must have one, which the data set checks with the missing id named.
    with_labels = files.gt_dir is not None and any(files.gt(i).is_file() for i in ids)
    dataset = EvalSet(cfg.data, cfg.test.split, with_labels=with_labels, full_labels=True)
    from datasets.verify import preflight
    preflight([(dataset, cfg.test.split)], info)
    nets = load_test_nets(cfg, ckpt_path, info.device, trust=getattr(args, "trust_checkpoint", False))
    barrier()
    if info.is_main:
        if maps_plan is not None:
            provenance.commit(maps_plan)
        save_run_config(run_dir, cfg)
    barrier()
    setup_logging(run_dir / "test.log" if info.is_main else None)
    loader = DataLoader(dataset, batch_size=cfg.data.val_batch_size, collate_fn=collate_eval,
                        sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                        num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                        worker_init_fn=loader_worker_init)
    fmt, dtype = cfg.test.logits_format, cfg.test.logits_dtype
    maps_note = "nothing saved (test.save_logits false)"
    if save:
        head = _head_size(nets, cfg, info.device)
        bound = bytes_bound(len(dataset), cfg.data.num_classes, head, head, fmt, dtype, cfg.test.compact_max_classes)
        maps_note = f"maps -> {out_dir} ({fmt}, {dtype}; at most {bound / 1e9:.2f} GB)"
    log.info(f"testing {ckpt_path} on '{cfg.test.split}' ({len(dataset)} ids, labels: {with_labels}) | "
             f"{info.world_size} process(es) on {info.device} | multi-scale {cfg.test.multi_scale} "
             f"flip {cfg.test.flip} | {maps_note}")

    num_classes = cfg.data.num_classes
    align = cfg.model.align_corners
    autocast = make_autocast(cfg, info.device)()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=info.device)
    conf_full = torch.zeros_like(conf)
    counts = torch.zeros(2, dtype=torch.long, device=info.device)  # written, read back
    # The results card's other rows (engine/results_card.py): each net alone and the other
    # inference setting, from the same forward passes (scored on the unrounded maps).
    settings_run = [(cfg.test.multi_scale, cfg.test.flip)]
    configured = (card.saved_net_name(len(nets)), card.inference_name(cfg.test.multi_scale, cfg.test.flip))
    if with_labels:
        settings_run += [s for s in map(card.inference_setting, cfg.test.card_inference) if s not in settings_run]
    # Every key on every rank from the start: a rank whose shard is empty still joins each all-reduce.
    conf_variants = {(net, card.inference_name(*setting)): torch.zeros_like(conf)
                     for net in card.net_names(len(nets)) for setting in settings_run} if with_labels else {}
    conf_variants.pop(configured, None)  # scored from the saved (rounded) map below
    t0 = time.time()
    for batch in tqdm(loader, desc="test", disable=not info.is_main, dynamic_ncols=True, leave=False):
        batch_ids = list(batch["id"])
        paths = [out_dir / f"{i}{suffix}" for i in batch_ids]
        images = batch["image"].to(info.device, non_blocking=True)
        reuse = save and not overwrite and all(p.is_file() for p in paths)
        variants = {}
        if not reuse or conf_variants:  # reused maps spare the nets only when the card needs no other row
            with autocast:
                variants = predict_variants(nets, images, cfg, settings_run, per_net=with_labels)
            classes = variants[configured][0].shape[1]
            if classes != num_classes:
                raise CheckpointError(f"the nets output {classes} classes, data.num_classes is {num_classes}")
        for key in conf_variants:
            conf_variants[key] += _full_resolution_confusion(variants[key][0].float(), batch["full_label"],
                                                             num_classes, align)
        if reuse:
            stored = torch.from_numpy(np.stack([load_saved_map(p, i, cfg) for p, i in zip(paths, batch_ids)]))
            stored = stored.to(info.device)
            full = F.interpolate(stored, size=images.shape[-2:], mode="bilinear", align_corners=align)
            counts[1] += len(batch_ids)
        else:
            pre, full = variants[configured]
            stored = pre.float()
            if save:
                # The original-resolution metric uses what test.py will read: the rounded map.
                written = [save_score_map(path, arr, fmt, dtype, cfg.test.compact_threshold,
                                          cfg.test.compact_max_classes) for path, arr in zip(paths, stored.cpu().numpy())]
                counts[0] += len(written)
                if with_labels and fmt == "compact":
                    stored = torch.from_numpy(np.stack([to_dense(m, REST_FLOOR) for m in written])).to(info.device)
                elif with_labels and dtype == "float16":
                    stored = stored.half().float()  # the rounding of the saved map, on the device
        if with_labels:
            conf += confusion_matrix(full.argmax(1), batch["label"].to(info.device), num_classes)
            conf_full += _full_resolution_confusion(stored, batch["full_label"], num_classes, align)
    all_reduce_sum(conf)
    all_reduce_sum(conf_full)
    all_reduce_sum(counts)
    for key in sorted(conf_variants):  # the same order on every rank
        all_reduce_sum(conf_variants[key])
    seconds = time.time() - t0
    written, reused = (int(v) for v in counts.tolist())
    # Every rank reads its share of the training labels; rank 0 alone took long enough on COCO
    # to outlast the others' wait at the closing barrier.
    quality = card.pseudo_label_quality(cfg, run_dir, info.rank, info.world_size) if with_labels else None
    summary = {"run_dir": str(run_dir), "logits_dir": str(out_dir) if save else None, "checkpoint": str(ckpt_path),
               "split": cfg.test.split, "num_images": len(dataset), "written": written, "reused": reused,
               "scores": None, "scores_original": None}
    if info.is_main:
        log.info(f"{written} maps written, {reused} already there (kept) | {seconds:.1f} s")
        if with_labels:
            names = entry.class_names(num_classes)
            scores = segmentation_scores(conf)
            original = segmentation_scores(conf_full)
            summary["scores"], summary["scores_original"] = scores, original
            save_json(run_dir / f"{out_dir.name}_scores.json", {
                "checkpoint": str(ckpt_path), "split": cfg.test.split, "num_images": len(dataset),
                "resolution": cfg.data.val_size, "multi_scale": cfg.test.multi_scale, "flip": cfg.test.flip,
                **scores, "original_resolution": {"class_names": names, **original}})
            log.info(f"{cfg.data.val_size}x{cfg.data.val_size} metrics on '{cfg.test.split}': "
                     f"mIoU {scores['miou']:.4f} | pixel acc {scores['pixel_acc']:.4f} | "
                     f"mean acc {scores['mean_acc']:.4f} | mean precision {scores['mean_precision']:.4f}")
            log.info("per-class IoU at the original resolution:\n" + iou_table(names, original["iou"]))
            present = sum(v is not None for v in original["iou"])
            log.info(f"original-resolution metrics on '{cfg.test.split}' (no CRF): mIoU {original['miou']:.4f} "
                     f"over {present} classes present | pixel acc {original['pixel_acc']:.4f}")
            common = {"split": cfg.test.split, "num_images": len(dataset), "source": "main.py --test"}
            rows = [card.make_row(original, *configured, False, "original", **common),
                    card.make_row(scores, *configured, False, f"{cfg.data.val_size}px", **common)]
            rows += [card.make_row(segmentation_scores(c), *key, False, "original", **common,
                                   note="scored in the test pass, map not saved")
                     for key, c in sorted(conf_variants.items())]
            for row in rows[2:]:
                log.info(f"  {row['net']}, {row['inference']}: mIoU {row['miou']:.4f} (original resolution, no CRF)")
            path = card.update_card(run_dir, card.checkpoint_entry(ckpt_path, run_dir), rows, class_names=names,
                                    config=to_dict(cfg), tool="main.py --test", seconds=seconds,
                                    scales=cfg.test.scales if any(m for m, _ in settings_run) else None,
                                    pseudo_labels=quality)
            log.info(f"results card: {path.with_suffix('.md')}")
        if save:
            log.info(f"next: python test.py --logits_dir {out_dir} --mode {'val' if with_labels else 'test'} [--crf]")
    barrier()
    return summary


@torch.no_grad()
def _head_size(nets: list[nn.Module], cfg: Config, device: torch.device) -> int:
    """Side of the nets' pre_logits for a val_size input (for the disk bound printed at start)."""
    size = cfg.data.val_size
    return int(nets[0](net_input(torch.zeros(1, 3, size, size, device=device), cfg))["pre_logits"].shape[-1])

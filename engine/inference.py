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

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.build import dataset_entry
from datasets.segmentation import EvalSet, collate_eval, loader_worker_init
from datasets.verify import preflight
from engine import checkpoint as ckpt_io
from engine import results_card as card
from engine.beco import num_nets
from engine.evaluate import ShardSampler
from models import build_model
from utils import provenance
from utils.config import Config, ConfigError, to_dict, to_yaml
from utils.crf import REST_FLOOR
from utils.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from utils.errors import CheckpointError, RunError
from utils.io import save_json
from utils.logs import log, setup_logging
from utils.metrics import confusion_matrix, iou_table, segmentation_scores
from utils.runtime import configure_backends, make_autocast, net_input, net_layout
from utils.score_maps import SUFFIX, ScoreMapError, bytes_bound, load_score_map, save_score_map, to_dense


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
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=maps.device)
    for m, label in zip(maps, labels):
        label = label.to(maps.device, non_blocking=True)
        up = F.interpolate(m[None].float(), size=label.shape, mode="bilinear", align_corners=align)
        conf += confusion_matrix(up[0].argmax(0), label, num_classes)
    return conf


@dataclass
class InferencePass:
    """One ``main.py --test``: what it reads and writes, and the (multi_scale, flip) settings it
    runs, the configured one first and then the results card's other rows."""
    cfg: Config
    info: DistInfo
    run_dir: Path
    ckpt_path: Path
    out_dir: Path
    overwrite: bool
    dataset: EvalSet
    with_labels: bool
    nets: list[nn.Module]
    settings: list[tuple[bool, bool]]
    configured: tuple[str, str]  # (net, inference) of the saved maps


@dataclass
class Sums:
    """This rank's counts, summed over the ranks at the end: confusion matrices at val_size
    (``conf``), at the original resolution (``full``) and of the card's other rows (``variants``,
    scored on unrounded maps), and the maps written and read back (``counts``)."""
    conf: torch.Tensor
    full: torch.Tensor
    counts: torch.Tensor
    variants: dict[tuple[str, str], torch.Tensor]

    def all_reduce(self) -> None:
        all_reduce_sum(self.conf)
        all_reduce_sum(self.full)
        all_reduce_sum(self.counts)
        for key in sorted(self.variants):  # the same order on every rank
            all_reduce_sum(self.variants[key])


def run_test(cfg: Config, ckpt: str | None, *, gpu_id: int | None, overwrite: bool, trust_checkpoint: bool) -> dict:
    """Save every id's averaged map (unless ``test.save_logits`` is off) and report the metrics
    at 512x512 and at the original resolution; returns a summary. ``overwrite``: recompute
    maps already saved rather than read them back."""
    test = prepare_test_pass(cfg, ckpt, gpu_id, overwrite, trust_checkpoint)
    info = test.info
    loader = DataLoader(test.dataset, batch_size=cfg.data.val_batch_size, collate_fn=collate_eval,
                        sampler=ShardSampler(len(test.dataset), info.rank, info.world_size),
                        num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                        worker_init_fn=loader_worker_init)
    _log_start(test)
    autocast = make_autocast(cfg, info.device)()
    sums = _zero_sums(test)
    t0 = time.time()
    for batch in tqdm(loader, desc="test", disable=not info.is_main, dynamic_ncols=True, leave=False):
        score_batch(test, sums, batch, autocast)
    sums.all_reduce()
    seconds = time.time() - t0
    written, reused = (int(v) for v in sums.counts.tolist())
    # Every rank reads its share of the training labels; rank 0 alone took long enough on COCO
    # to outlast the others' wait at the closing barrier.
    quality = card.pseudo_label_quality(cfg, test.run_dir, info.rank, info.world_size) if test.with_labels else None
    save = cfg.test.save_logits
    summary = {"run_dir": str(test.run_dir), "logits_dir": str(test.out_dir) if save else None,
               "checkpoint": str(test.ckpt_path), "split": cfg.test.split, "num_images": len(test.dataset),
               "written": written, "reused": reused, "scores": None, "scores_original": None}
    if info.is_main:
        log.info(f"{written} maps written, {reused} already there (kept) | {seconds:.1f} s")
        if test.with_labels:
            summary["scores"], summary["scores_original"] = report(test, sums, seconds, quality)
        if save:
            log.info(f"next: python test.py --logits_dir {test.out_dir} --mode "
                     f"{'val' if test.with_labels else 'test'} [--crf]")
    barrier()
    return summary


def prepare_test_pass(cfg: Config, ckpt: str | None, gpu_id: int | None, overwrite: bool,
                 trust_checkpoint: bool) -> InferencePass:
    """Every check before the pass (settings, checkpoint, data, the maps folder's provenance),
    then the maps folder and the run's config.yaml written, and test.log opened."""
    configure_backends(cfg)  # cuDNN autotuning, TF32, --determ: before CUDA starts, as in training
    if (cfg.test.multi_scale or any("msc" in s for s in cfg.test.card_inference)) and not cfg.test.scales:
        raise ConfigError("config key 'test.scales': multi-scale testing (test.multi_scale or a multi-scale "
                          "test.card_inference entry) needs at least one scale")
    info = init_distributed(gpu_id, cfg.dist.timeout_min)
    run_dir = test_run_dir(cfg, ckpt)
    ckpt_path = resolve_checkpoint(cfg, ckpt, run_dir)
    out_dir = run_dir / logits_folder_name(cfg)
    files = dataset_entry(cfg.data.dataset).files(cfg.data, cfg.test.split)
    # Every rank decides before anything is written; the maps go (with --overwrite) only after
    # the data and the checkpoint have passed their checks below.
    maps_plan = provenance.plan(out_dir, map_record(cfg, ckpt_path), MAP_PATTERNS, overwrite=overwrite,
                                legacy="_settings.json") if cfg.test.save_logits else None

    # Labels are read when the split has any ground truth (VOC's test split has none); then every
    # id must have one, which the data set checks with the missing id named.
    with_labels = files.gt_dir is not None and any(files.gt(i).is_file() for i in files.ids)
    dataset = EvalSet(cfg.data, cfg.test.split, with_labels=with_labels, full_labels=True)
    preflight([(dataset, cfg.test.split)], info)
    nets = load_test_nets(cfg, ckpt_path, info.device, trust=trust_checkpoint)
    barrier()
    if info.is_main:
        if maps_plan is not None:
            provenance.commit(maps_plan)
        save_run_config(run_dir, cfg)
    barrier()
    setup_logging(run_dir / "test.log" if info.is_main else None)
    settings = [(cfg.test.multi_scale, cfg.test.flip)]
    if with_labels:
        settings += [s for s in map(card.inference_setting, cfg.test.card_inference) if s not in settings]
    configured = (card.saved_net_name(len(nets)), card.inference_name(cfg.test.multi_scale, cfg.test.flip))
    return InferencePass(cfg, info, run_dir, ckpt_path, out_dir, overwrite, dataset, with_labels, nets, settings,
                    configured)


def _log_start(test: InferencePass) -> None:
    cfg, info = test.cfg, test.info
    fmt, dtype = cfg.test.logits_format, cfg.test.logits_dtype
    maps_note = "nothing saved (test.save_logits false)"
    if cfg.test.save_logits:
        head = _head_size(test.nets, cfg, info.device)
        bound = bytes_bound(len(test.dataset), cfg.data.num_classes, head, head, fmt, dtype,
                            cfg.test.compact_max_classes)
        maps_note = f"maps -> {test.out_dir} ({fmt}, {dtype}; at most {bound / 1e9:.2f} GB)"
    log.info(f"testing {test.ckpt_path} on '{cfg.test.split}' ({len(test.dataset)} ids, labels: {test.with_labels}) | "
             f"{info.world_size} process(es) on {info.device} | multi-scale {cfg.test.multi_scale} "
             f"flip {cfg.test.flip} | {maps_note}")


def _zero_sums(test: InferencePass) -> Sums:
    num_classes = test.cfg.data.num_classes
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=test.info.device)
    counts = torch.zeros(2, dtype=torch.long, device=test.info.device)  # written, read back
    # The results card's other rows (engine/results_card.py): each net alone and the other
    # inference setting, from the same forward passes (scored on the unrounded maps). Every key
    # on every rank from the start: a rank whose shard is empty still joins each all-reduce.
    variants = {(net, card.inference_name(*setting)): torch.zeros_like(conf)
                for net in card.net_names(len(test.nets)) for setting in test.settings} if test.with_labels else {}
    variants.pop(test.configured, None)  # scored from the saved (rounded) map
    return Sums(conf, torch.zeros_like(conf), counts, variants)


def score_batch(test: InferencePass, sums: Sums, batch: dict, autocast) -> None:
    """One batch of ids: their maps computed and saved, or read back when saved already (and the
    card needs no other row), and counted into ``sums``."""
    cfg, device = test.cfg, test.info.device
    num_classes, align = cfg.data.num_classes, cfg.model.align_corners
    batch_ids = list(batch["id"])
    paths = [test.out_dir / f"{i}{SUFFIX[cfg.test.logits_format]}" for i in batch_ids]
    images = batch["image"].to(device, non_blocking=True)
    reuse = cfg.test.save_logits and not test.overwrite and all(p.is_file() for p in paths)
    variants = {}
    if not reuse or sums.variants:  # reused maps spare the nets only when the card needs no other row
        with autocast:
            variants = predict_variants(test.nets, images, cfg, test.settings, per_net=test.with_labels)
        classes = variants[test.configured][0].shape[1]
        if classes != num_classes:
            raise CheckpointError(f"the nets output {classes} classes, data.num_classes is {num_classes}")
    for key in sums.variants:
        sums.variants[key] += _full_resolution_confusion(variants[key][0].float(), batch["full_label"],
                                                         num_classes, align)
    if reuse:
        stored = torch.from_numpy(np.stack([load_saved_map(p, i, cfg) for p, i in zip(paths, batch_ids)]))
        stored = stored.to(device)
        full = F.interpolate(stored, size=images.shape[-2:], mode="bilinear", align_corners=align)
        sums.counts[1] += len(batch_ids)
    else:
        pre, full = variants[test.configured]
        stored = _save_maps(test, sums, pre, paths)
    if test.with_labels:
        sums.conf += confusion_matrix(full.argmax(1), batch["label"].to(device), num_classes)
        sums.full += _full_resolution_confusion(stored, batch["full_label"], num_classes, align)


def _save_maps(test: InferencePass, sums: Sums, pre: torch.Tensor, paths: list[Path]) -> torch.Tensor:
    """The batch's head-resolution maps saved (unless ``test.save_logits`` is off); returned as
    the original-resolution metric must score them: as test.py will read them, rounded."""
    cfg = test.cfg
    fmt, dtype = cfg.test.logits_format, cfg.test.logits_dtype
    stored = pre.float()
    if cfg.test.save_logits:
        written = [save_score_map(path, arr, fmt, dtype, cfg.test.compact_threshold,
                                  cfg.test.compact_max_classes) for path, arr in zip(paths, stored.cpu().numpy())]
        sums.counts[0] += len(written)
        if test.with_labels and fmt == "compact":
            stored = torch.from_numpy(np.stack([to_dense(m, REST_FLOOR) for m in written])).to(test.info.device)
        elif test.with_labels and dtype == "float16":
            stored = stored.half().float()  # the rounding of the saved map, on the device
    return stored


def report(test: InferencePass, sums: Sums, seconds: float, quality: dict | None) -> tuple[dict, dict]:
    """Rank 0, with labels: the scores file, the metrics logged, the results card updated;
    returns the scores at val_size and at the original resolution."""
    cfg, ckpt_path = test.cfg, test.ckpt_path
    names = dataset_entry(cfg.data.dataset).class_names(cfg.data.num_classes)
    scores = segmentation_scores(sums.conf)
    original = segmentation_scores(sums.full)
    save_json(test.run_dir / f"{test.out_dir.name}_scores.json", {
        "checkpoint": str(ckpt_path), "split": cfg.test.split, "num_images": len(test.dataset),
        "resolution": cfg.data.val_size, "multi_scale": cfg.test.multi_scale, "flip": cfg.test.flip,
        **scores, "original_resolution": {"class_names": names, **original}})
    log.info(f"{cfg.data.val_size}x{cfg.data.val_size} metrics on '{cfg.test.split}': "
             f"mIoU {scores['miou']:.4f} | pixel acc {scores['pixel_acc']:.4f} | "
             f"mean acc {scores['mean_acc']:.4f} | mean precision {scores['mean_precision']:.4f}")
    log.info("per-class IoU at the original resolution:\n" + iou_table(names, original["iou"]))
    present = sum(v is not None for v in original["iou"])
    log.info(f"original-resolution metrics on '{cfg.test.split}' (no CRF): mIoU {original['miou']:.4f} "
             f"over {present} classes present | pixel acc {original['pixel_acc']:.4f}")
    common = {"split": cfg.test.split, "num_images": len(test.dataset), "source": "main.py --test"}
    rows = [card.make_row(original, *test.configured, False, "original", **common),
            card.make_row(scores, *test.configured, False, f"{cfg.data.val_size}px", **common)]
    rows += [card.make_row(segmentation_scores(c), *key, False, "original", **common,
                           note="scored in the test pass, map not saved")
             for key, c in sorted(sums.variants.items())]
    for row in rows[2:]:
        log.info(f"  {row['net']}, {row['inference']}: mIoU {row['miou']:.4f} (original resolution, no CRF)")
    path = card.update_card(test.run_dir, card.checkpoint_entry(ckpt_path, test.run_dir), rows, class_names=names,
                            config=to_dict(cfg), tool="main.py --test", seconds=seconds,
                            scales=cfg.test.scales if any(m for m, _ in test.settings) else None,
                            pseudo_labels=quality)
    log.info(f"results card: {path.with_suffix('.md')}")
    return scores, original


@torch.no_grad()
def _head_size(nets: list[nn.Module], cfg: Config, device: torch.device) -> int:
    """Side of the nets' pre_logits for a val_size input (for the disk bound printed at start)."""
    size = cfg.data.val_size
    return int(nets[0](net_input(torch.zeros(1, 3, size, size, device=device), cfg))["pre_logits"].shape[-1])

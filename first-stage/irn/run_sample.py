"""First stage driver: IRN pseudo-labels and confidence masks for VOC or COCO 2014.

    python first-stage/irn/run_sample.py --voc12_root data/VOC2012 --work_dir data/first_stage \\
        --backbone_weights model_weights/resnet50-19c8e357.pth --steps all --export_to data/
    python first-stage/irn/run_sample.py --dataset coco --coco_root data/coco --work_dir data/first_stage_coco \\
        --backbone_weights model_weights/resnet50-19c8e357.pth --steps all --export_to data/coco/

Steps run in this fixed order (any subset via --steps a,b,c or --steps all):
    train_cam, make_cam, eval_cam, cam_to_ir_label, train_irn, make_sem_seg, eval_sem_seg,
    gen_mask, export
Everything is written under --work_dir:
    sess/                 CAM and IRN weights
    result/cam            <id>.npy  {keys, cam, high_res}
    result/ir_label       <id>.png  0 / 1..C / 255 seeds for IRN
    result/sem_seg        <id>.png  pseudo-labels 0..C
    result/score          <id>.pt   {pred, score, keys}
    result/mask_irn       <id>.png  confidence masks (RGB 0/255)
    logs/, log.txt (appended), summary.json (each step's time and metric, merged across runs;
                          "runtime": --determ, threads, CPU kernels, library versions of the last run)
Each output folder holds _provenance.json (sess/: _provenance.<step>.json): the options and inputs
that made it (utils/provenance.py). A step reuses outputs only when the record matches; when it
differs the run stops before the first step, naming each difference (--overwrite redoes them).
Option defaults are the reference's (spec §3.1); quirks kept by default sit behind named options.

--dataset voc (default, C = 20): <voc12_root>/JPEGImages, SegmentationClass, ImageSets/Segmentation.
--dataset coco (C = 80, spec §16): the tree of tools/prepare_coco.py under --coco_root
(train2014/, val2014/, mask/{train,val}2014/<int id>.png, lists/{train,val}2014.txt,
cls_labels_{train,val}2014.json). CAM training, make_cam, cam_to_ir_label, IRN training and
its mean-shift pass, make_sem_seg and the evaluation (mask/train2014, 81 classes, no void) run
on train2014; the CAM validation loss on val2014. Every output is named by the file stem
(COCO_train2014_000000000009.png). Defaults that differ: --conf_fg_thres 0.35 and
--conf_bg_thres 0.10 (VOC 0.30 / 0.05) unless given. IRN inference runs on the unpadded image
(--irn_infer_pad_to none, BECO). Decisions on the reference's COCO gaps:
  QUIRK-17  the CAM network is the repository's VOC/IRN one with 80 classes, gradients cut
            after layer2 (--cam_freeze_until stage2, the default); --cam_freeze_until stem gives
            the ReCAM-style variant (layer1/layer2 trainable, only the stem frozen).
  QUIRK-15  an image without any class gets an all-background pseudo-label and a full-size
            mask: --no_class_mask random_half (default: half its pixels, seeded by --seed and
            the id) or zero (no pixel confident).
  QUIRK-18  every evaluation accumulates its confusion matrix image by image.
make_cam and make_sem_seg use one process per visible GPU (or --cpu_shards on the CPU),
cam_to_ir_label --num_workers CRF processes; results do not depend on the split.

Before the first step the data the chosen steps read is checked in full (misc/preflight.py):
the data root (--voc12_root / --coco_root), every id's image and image-level labels (VOC: the
Annotations XML exists and parses, or --cls_labels holds the id; COCO: cls_labels_<split>2014.json)
of the train and val lists, the infer list's images, the evaluation ids' ground truth. A bad
file stops the run naming the first bad id, its file and how many fail. Images without any
class are reported then (log warning, "preflight" in summary.json, logs/no_class_ids.txt) and
counted again by gen_mask and export. --no_class_mask skip is refused: the second stage trains
on every id of its own list (VOC train_aug.txt, COCO train2014/) and needs a label and a mask
for each, so the export cannot leave images out.

Errors, as main.py reports them: an error of the project's own types (bad or missing data,
option values argparse cannot check, outputs of earlier steps that do not fit) prints one line
"error: <message>" on stderr, its traceback goes to <work_dir>/log.txt, and the exit code is
2 for option / usage errors, 1 for data and run errors (argparse's own errors: 2). Anything
else is a bug and keeps its traceback. main(argv) raises them all (Python callers); cli(argv)
is the command.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (str(HERE), str(REPO)):  # first-stage/irn packages (net, step, misc) + repo packages
    if _p not in sys.path:
        sys.path.insert(0, _p)

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR  # noqa: E402
from misc.errors import OptionError, RunError  # noqa: E402
from misc.runtime import LOGGER_NAME  # noqa: E402
from utils.io import save_json  # noqa: E402

STEPS: tuple[str, ...] = ("train_cam", "make_cam", "eval_cam", "cam_to_ir_label", "train_irn",
                          "make_sem_seg", "eval_sem_seg", "gen_mask", "export")
# step name -> module under step/ (imported lazily: PART B's steps may be absent)
NO_CLASS_CHOICES = ("random_half", "zero", "skip")  # skip: refused, see SKIP_REFUSED
STEP_MODULES: dict[str, str] = {
    "train_cam": "step.train_cam", "make_cam": "step.make_cam", "eval_cam": "step.eval_cam",
    "cam_to_ir_label": "step.cam_to_ir_label", "train_irn": "step.train_irn",
    "make_sem_seg": "step.make_sem_seg_labels", "eval_sem_seg": "step.eval_sem_seg",
    "gen_mask": "step.gen_mask",
}


# ----------------------------------------------------------------------------- option types


def str2bool(v: str | bool) -> bool:
    """Proper booleans for flags given a value (QUIRK-6 fixed: "False" means false)."""
    if isinstance(v, bool):
        return v
    s = v.strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def float_list(v: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in v.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {v!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def int_pair(v: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in v.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers 'MIN,MAX', got {v!r}") from None
    if a > b:
        raise argparse.ArgumentTypeError(f"MIN must be <= MAX, got {v!r}")
    return a, b


class DatasetDefault(float):
    """A float option's default that depends on --dataset (VOC value, COCO value).

    ``parse_args`` keeps this object when the flag is absent, so ``resolve_paths`` can tell
    "not given" from an explicit value equal to the VOC default and put in the data set's value;
    an explicit flag is never overridden.
    """

    def __new__(cls, voc: float, coco: float | None = None) -> "DatasetDefault":
        obj = super().__new__(cls, voc)
        obj.per_dataset = {"voc": float(voc), "coco": float(voc if coco is None else coco)}
        return obj

    def __str__(self) -> str:
        return f"{self.per_dataset['voc']:g} (COCO: {self.per_dataset['coco']:g})"

    def resolve(self, dataset: str) -> float:
        return self.per_dataset[dataset]


def optional_int(v: str) -> int | None:
    return None if v.strip().lower() in ("", "none", "null") else int(v)


def step_list(v: str) -> list[str]:
    if v.strip() == "all":
        return list(STEPS)
    chosen = [s.strip() for s in v.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)} or 'all'")
    return [s for s in STEPS if s in chosen]  # always the fixed order


# ----------------------------------------------------------------------------- options


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


class _Group:
    """``add_argument`` that gives every option a help string, so its default is listed."""

    def __init__(self, group: argparse._ArgumentGroup):
        self.group = group

    def add_argument(self, *names: str, **kw: Any) -> argparse.Action:
        kw.setdefault("help", " ")
        return self.group.add_argument(*names, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    _add = p.add_argument_group

    def add_group(title: str) -> _Group:
        return _Group(_add(title))

    g = add_group("run")
    a = g.add_argument
    a("--dataset", choices=("voc", "coco"), default="voc",
      help="voc: --voc12_root (20 classes); coco: the prepared COCO 2014 tree under --coco_root (80 classes, "
           "spec §16; see the description above)")
    a("--voc12_root", type=Path, default=Path("./VOCdevkit/VOC2012"),
      help="VOC2012 folder (JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation); --dataset voc")
    a("--coco_root", type=Path, default=Path("data/coco"),
      help="--dataset coco: tools/prepare_coco.py's tree (train2014/, val2014/, mask/, lists/, cls_labels_*.json)")
    a("--work_dir", type=Path, default=Path("data/first_stage"), help="every output goes under this (created)")
    a("--steps", type=step_list, default="all", help=f"comma list of {', '.join(STEPS)}; or all")
    a("--export_to", type=Path, default=None,
      help=f"export step: copy sem_seg → DIR/{PSEUDO_LABEL_DIR} and mask_irn → DIR/{MASK_DIR}")
    a("--seed", type=int, default=0, help="seeds Python, numpy, torch and loader workers (QUIRK-3 fix)")
    a("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    a("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
      help="data-loader workers and CRF processes; cpu_count//2 here")
    a("--max_images", type=optional_int, default=None,
      help="use only the first N ids of every list (smoke runs); eval keeps eval ids among them")
    a("--torch_threads", type=optional_int, default=None,
      help="torch intra-op CPU threads (default: torch's choice; 1 avoids OpenMP slowdowns on busy machines). "
           "Part of the result: 1 and 2 threads give different weights")
    a("--determ", action="store_true",
      help="deterministic algorithms (torch.use_deterministic_algorithms, warn only), cuDNN deterministic and "
           "benchmark off, also in make_cam / make_sem_seg shard processes: a machine then repeats its own "
           "numbers bit for bit on GPUs too (the CPU path already does). Other machines (CPU kernels, threads, "
           "library versions; summary.json \"runtime\") may still differ")
    a("--cpu_shards", type=int, default=1,
      help="make_cam / make_sem_seg on the CPU: spread the ids round-robin over this many processes "
           "(GPUs: one process per visible GPU regardless)")
    a("--overwrite", action="store_true",
      help="redo the chosen steps' outputs (default: reuse those their folder's _provenance.json says were made "
           "with the same options and inputs; outputs made otherwise are refused, naming the differences)")
    a("--no_progress", action="store_true", help="no progress bars")

    g = add_group("data")
    a = g.add_argument
    a("--train_list", type=Path, default=None,
      help="default <voc12_root>/ImageSets/Segmentation/train_aug.txt; COCO <coco_root>/lists/train2014.txt")
    a("--val_list", type=Path, default=None,
      help="CAM validation loss; default <voc12_root>/ImageSets/Segmentation/val.txt; COCO lists/val2014.txt")
    a("--infer_list", type=Path, default=None,
      help="IRN mean-shift pass; default <voc12_root>/ImageSets/Segmentation/train.txt; COCO lists/train2014.txt")
    a("--chainer_eval_set", default="train",
      help="evaluation split: VOC ImageSets/Segmentation/<set>.txt, GT SegmentationClass; "
           "COCO train|val: lists/<set>2014.txt, GT mask/<set>2014")
    a("--cls_labels", type=Path, default=None,
      help="image-level labels JSON (datasets/voc_cls_labels format); VOC default <voc12_root>/cls_labels.json, "
           "else Annotations/*.xml; COCO default <coco_root>/cls_labels_<split>2014.json of each id's split "
           "(one file given here must hold every id)")

    g = add_group("backbone")
    a = g.add_argument
    a("--backbone_depth", type=int, choices=(18, 34, 50), default=50, help="ResNet depth (50 = reference)")
    a("--backbone_weights", type=str, default=None,
      help="torchvision ImageNet ResNet file (e.g. resnet50-19c8e357.pth); none = train from scratch (warned)")

    a("--backbone_bn", choices=("fixed", "batch"), default="fixed",
      help="fixed = reference (running statistics, never updated); batch = ordinary BatchNorm, "
           "needed to train from scratch (the synthetic demo)")

    g = add_group("CAM (spec §3.1, §6–§9)")
    a = g.add_argument
    a("--cam_network", default="net.resnet50_cam")
    a("--cam_crop_size", type=int, default=512, help="training crop (the reference hard-codes 512)")
    a("--cam_resize_long", type=int_pair, default="320,640", help="random long-side range 'MIN,MAX'")
    a("--cam_batch_size", type=int, default=16)
    a("--cam_num_epoches", type=int, default=5)
    a("--cam_learning_rate", type=float, default=0.1)
    a("--cam_weight_decay", type=float, default=1e-4)
    a("--cam_classifier_lr_mult", type=float, default=10.0, help="classifier lr = this × cam_learning_rate")
    a("--cam_freeze_until", choices=("stage2", "stem", "none"), default="stage2",
      help="QUIRK-17: stage2 = reference VOC/IRN network (gradients cut after layer2; also COCO's default, "
           "with 80 classes), stem = ReCAM variant (only the stem frozen), none = train all")
    a("--cam_val_loss", type=str2bool, default=True, help="print a validation loss per epoch (no effect on weights)")
    a("--cam_eval_thres", type=float, default=0.15)
    a("--cam_eval_sweep", type=lambda v: float_list(v) if v.strip() else (), default="", help="eval_cam: also report mIoU at these thresholds")
    a("--cam_scales", type=float_list, default="1.0,0.5,1.5,2.0", help="make_cam scales, comma list")
    a("--conf_fg_thres", type=float, default=DatasetDefault(0.30, 0.35),
      help="cam_to_ir_label confident-foreground threshold; default by --dataset")
    a("--conf_bg_thres", type=float, default=DatasetDefault(0.05, 0.10),
      help="cam_to_ir_label confident-background threshold; default by --dataset")
    a("--crf_gt_prob", type=float, default=0.7)
    a("--crf_iters", type=int, default=10)
    a("--crf_gauss_sxy", type=float, default=3.0)
    a("--crf_gauss_compat", type=float, default=3.0)
    a("--crf_bi_sxy", type=float, default=50.0)
    a("--crf_bi_srgb", type=float, default=5.0)
    a("--crf_bi_compat", type=float, default=10.0)

    g = add_group("IRN (spec §3.1, §10–§14)")
    a = g.add_argument
    a("--irn_network", default="net.resnet50_irn")
    a("--irn_crop_size", type=int, default=512)
    a("--irn_batch_size", type=int, default=32)
    a("--irn_num_epoches", type=int, default=3)
    a("--irn_learning_rate", type=float, default=0.1)
    a("--irn_weight_decay", type=float, default=1e-4)
    a("--irn_disp_lr_mult", type=float, default=10.0, help="displacement-branch lr = this × irn_learning_rate")
    a("--irn_backbone_from_cam", type=str2bool, default=False,
      help="start IRN's (frozen) backbone from the trained CAM backbone (not the reference; for runs without ImageNet)")
    a("--irn_train_backbone", type=str2bool, default=False,
      help="train IRN's backbone with the edge branch (reference: frozen); a from-scratch aid")
    a("--radius", type=int, default=10, help="IRN training path radius")
    a("--rw_radius", type=int, default=5, help="random-walk radius")
    a("--beta", type=int, default=10)
    a("--exp_times", type=int, default=8, help="random walk of 2^exp_times steps")
    a("--rw_mode", choices=("sparse", "dense"), default="sparse", help="sparse propagation or the reference's dense powers")
    a("--rw_sparse_dtype", choices=("float64", "float32"), default="float64", help="sparse random-walk precision")
    a("--rw_allow_tf32", type=str2bool, default=False, help="QUIRK-2: TF32 matmuls in the dense random walk")
    a("--irn_infer_pad_to", type=optional_int, default=None, help="QUIRK-11: pad IRN inference input to this (IRN: 512)")
    a("--ins_seg_bg_thres", type=float, default=0.25, help="instance steps (not part of this pipeline)")
    a("--sem_seg_bg_thres", type=float, default=0.25)
    a("--score_fp16", type=str2bool, default=False, help="save score tensors as float16 (COCO parity; default float32)")
    a("--margin_tie_mode", choices=("original", "zero"), default="original", help="QUIRK-13 gen_mask tie rule")
    a("--mask_thd", type=float, default=0.5, help="gen_mask keep fraction")
    a("--no_class_mask", choices=NO_CLASS_CHOICES, default="random_half",
      help="QUIRK-15 fixed: gen_mask's full-size mask of an image without any class (COCO): random_half = "
           "int(N/(1/mask_thd)) of its N pixels (floor(N/2)), seeded by --seed and the id; zero = none; "
           "skip is refused (the second stage's list keeps the images; see the description)")

    g = add_group("optimiser (spec §18)")
    a = g.add_argument
    a("--sgd_momentum", type=float, default=1e-4, help="QUIRK-20 KEEP: the reference's SGD momentum is 1e-4")
    a("--poly_power", type=float, default=0.9)

    g = add_group("output paths (default: under --work_dir)")
    a = g.add_argument
    for name, what in (("cam_weights_name", "sess/res<depth>_cam.pth"), ("irn_weights_name", "sess/res<depth>_irn.pth"),
                       ("cam_out_dir", "result/cam"), ("ir_label_out_dir", "result/ir_label"),
                       ("sem_seg_out_dir", "result/sem_seg"), ("score_dir", "result/score"),
                       ("mask_out_dir", "result/mask_irn")):
        a(f"--{name}", type=Path, default=None, help=f"default <work_dir>/{what}")
    return p


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the derived paths and the data-set-dependent defaults (QUIRK-5 fixed: one work dir,
    everything created)."""
    w = args.work_dir
    dataset = getattr(args, "dataset", "voc")
    for name in ("conf_fg_thres", "conf_bg_thres"):
        value = getattr(args, name, None)
        if isinstance(value, DatasetDefault):
            setattr(args, name, value.resolve(dataset))
    if dataset == "coco":
        from datasets.coco import list_name
        lists = args.coco_root / "lists"
        args.train_list = args.train_list or lists / list_name("train")
        args.val_list = args.val_list or lists / list_name("val")
        args.infer_list = args.infer_list or lists / list_name("train")
    else:
        lists = args.voc12_root / "ImageSets" / "Segmentation"
        args.train_list = args.train_list or lists / "train_aug.txt"
        args.val_list = args.val_list or lists / "val.txt"
        args.infer_list = args.infer_list or lists / "train.txt"
        if args.cls_labels is None and (args.voc12_root / "cls_labels.json").is_file():
            args.cls_labels = args.voc12_root / "cls_labels.json"
    d = args.backbone_depth
    defaults = {"cam_weights_name": w / "sess" / f"res{d}_cam.pth", "irn_weights_name": w / "sess" / f"res{d}_irn.pth",
                "cam_out_dir": w / "result" / "cam", "ir_label_out_dir": w / "result" / "ir_label",
                "sem_seg_out_dir": w / "result" / "sem_seg", "score_dir": w / "result" / "score",
                "mask_out_dir": w / "result" / "mask_irn"}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.log_dir = w / "logs"
    args.log_name = w / "log.txt"
    args.summary_path = w / "summary.json"
    for path in (w / "sess", args.cam_out_dir, args.ir_label_out_dir, args.sem_seg_out_dir, args.score_dir,
                 args.mask_out_dir, args.log_dir, args.cam_weights_name.parent, args.irn_weights_name.parent):
        path.mkdir(parents=True, exist_ok=True)
    return args


# --no_class_mask skip: why it is refused (the export cannot leave ids out of the second stage's list).
SKIP_REFUSED = (
    "--no_class_mask skip cannot be honoured: the second stage trains on every id of its own list "
    "(VOC: ImageSets/Segmentation/train_aug.txt of the VOC root; COCO: every image of train2014/, or "
    "lists/train2014.txt with data.list_dir lists) and stops at an id without a pseudo-label and a mask, so "
    "the export cannot leave images out. Remove those ids from --train_list and from the second stage's list "
    "instead (a run lists them in <work_dir>/logs/no_class_ids.txt), or use random_half (default) or zero")


def check_options(args: argparse.Namespace) -> None:
    """Option values argparse cannot check; an OptionError (exit 2) names the flag."""
    at_least = {"max_images": 1, "cpu_shards": 1, "num_workers": 0, "cam_batch_size": 1, "irn_batch_size": 1,
                "cam_crop_size": 1, "irn_crop_size": 1, "cam_num_epoches": 1, "irn_num_epoches": 1}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise OptionError(f"--{name} must be >= {low}, got {value}")
    if not 0.0 < args.mask_thd <= 1.0:
        raise OptionError(f"--mask_thd must be in (0, 1], got {args.mask_thd}")
    if args.no_class_mask == "skip":
        raise OptionError(SKIP_REFUSED)
    from misc.preflight import check_path_options
    check_path_options(args)
    from misc.runtime import resolve_device
    resolve_device(args.device)  # DeviceError (an OptionError) for a device this machine lacks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, checked (OptionError: exit 2), with the derived paths (created)."""
    args = build_parser().parse_args(argv)
    check_options(args)
    return resolve_paths(args)


# ----------------------------------------------------------------------------- logging and summary


def setup_logging(args: argparse.Namespace) -> logging.Logger:
    """Console + ``<work_dir>/log.txt`` in append mode (QUIRK-7 fixed)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(args.log_name, mode="a")):
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


def read_summary(summary_path: Path) -> dict[str, Any]:
    """summary.json as it is (empty when missing or cut by a kill: it is rewritten whole)."""
    if summary_path.is_file():
        try:
            return json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def record_step(summary_path: Path, step: str, seconds: float, metrics: dict[str, Any],
                args: argparse.Namespace) -> None:
    """Merge one step's entry into summary.json (re-read each time: runs accumulate)."""
    summary = read_summary(summary_path)
    steps = summary.setdefault("steps", {})
    now = _dt.datetime.now().isoformat(timespec="seconds")
    if metrics.get("skipped") and step in steps and not steps[step].get("metrics", {}).get("skipped"):
        steps[step]["last_skipped"] = now  # outputs already there: keep the run that made them
    else:
        steps[step] = {"seconds": round(seconds, 3), "finished": now, "metrics": _json_safe(metrics)}
    summary["config"] = {k: _json_safe(v) for k, v in sorted(vars(args).items())}
    save_json(summary_path, summary)


def record_preflight(summary_path: Path, report: dict[str, Any]) -> None:
    """summary.json's "preflight": what was checked before the steps, the images without class."""
    summary = read_summary(summary_path)
    summary["preflight"] = {"finished": _dt.datetime.now().isoformat(timespec="seconds"), **_json_safe(report)}
    save_json(summary_path, summary)


def record_runtime(summary_path: Path, facts: dict[str, Any]) -> None:
    """summary.json's "runtime": --determ, threads, CPU kernels and library versions of the last run.

    The same seed gives the same numbers only where these agree (and never across CPUs whose
    oneDNN / ATen kernels differ), so two runs' summaries show why their numbers may differ.
    """
    summary = read_summary(summary_path)
    summary["runtime"] = {"recorded": _dt.datetime.now().isoformat(timespec="seconds"), **_json_safe(facts)}
    save_json(summary_path, summary)


# ----------------------------------------------------------------------------- export


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Copy pseudo-labels and masks to where the second stage reads them (§15), train_list ids only.

    Every id is exported, those without any class too (all-background label, the mask of
    --no_class_mask): the second stage's list holds them. They are counted and named.
    """
    log = logging.getLogger(LOGGER_NAME)
    if args.export_to is None:
        # `--steps all` includes export; without a target there is nothing to do, say so loudly.
        log.warning("export: no --export_to DIR given, nothing exported")
        return {"skipped": True}
    from misc.errors import MissingInputError
    from misc.runtime import read_ids
    ids = read_ids(args, "train_list")
    counts: dict[str, Any] = {}
    for src_dir, name in ((args.sem_seg_out_dir, PSEUDO_LABEL_DIR), (args.mask_out_dir, MASK_DIR)):
        missing = [i for i in ids if not (Path(src_dir) / f"{i}.png").is_file()]
        if missing:
            raise MissingInputError(f"export: {len(missing)} of {len(ids)} files missing in {src_dir}, e.g. id "
                                    f"'{missing[0]}': {Path(src_dir) / (missing[0] + '.png')}")
    for src_dir, name in ((args.sem_seg_out_dir, PSEUDO_LABEL_DIR), (args.mask_out_dir, MASK_DIR)):
        dst = Path(args.export_to) / name
        dst.mkdir(parents=True, exist_ok=True)
        for i in ids:
            tmp = dst / f".{i}.png.tmp"
            shutil.copyfile(Path(src_dir) / f"{i}.png", tmp)
            os.replace(tmp, dst / f"{i}.png")  # atomic per file
        counts[name] = len(ids)
    counts.update(_exported_no_class(args, ids, log))
    return {"export_to": str(args.export_to), **counts}


def _exported_no_class(args: argparse.Namespace, ids: list[str], log: logging.Logger) -> dict[str, Any]:
    """Count and name the exported images without class; their policy read off their masks."""
    from misc.preflight import known_no_class, no_class_report, no_class_sentence, policy_text, shown
    from step.gen_mask import no_class_policy_of, read_mask_png
    empty = known_no_class(args, ids)
    if empty is None:
        log.warning("export: image-level labels of the train list unavailable: cannot tell which exported images "
                    "have no class")
        return {"no_class_images": None}
    out = no_class_report(empty)
    if not empty:
        return out
    policies = {no_class_policy_of(read_mask_png(Path(args.mask_out_dir) / f"{i}.png"), args.mask_thd) for i in empty}
    if len(policies) == 1 and None not in policies:
        out["no_class_mask"] = policies.pop()
        text = policy_text(out["no_class_mask"], args.mask_thd)
    else:
        out["no_class_mask"] = "mixed"
        text = ("their masks were made with different --no_class_mask values (rerun gen_mask with --overwrite "
                "for one policy)")
    log.warning(f"export: {no_class_sentence(len(empty), text)}; ids {shown(empty)}")
    return out


# ----------------------------------------------------------------------------- provenance

# What each step's outputs depend on (utils/provenance.py): the options that change their bytes,
# the earlier steps whose outputs it reads, and the lists and files it reads. Threads, devices,
# worker counts and progress bars are left out: they change float rounding at most.
# outputs: (path option, glob of the files the step writes there; None = the path is the file).
STEP_PROVENANCE: dict[str, dict[str, Any]] = {
    "train_cam": {"outputs": (("cam_weights_name", None),), "after": (), "lists": ("train_list",),
                  "files": ("backbone_weights", "cls_labels"),
                  "settings": ("backbone_depth", "backbone_bn", "cam_network", "cam_crop_size", "cam_resize_long",
                               "cam_batch_size", "cam_num_epoches", "cam_learning_rate", "cam_weight_decay",
                               "cam_classifier_lr_mult", "cam_freeze_until", "sgd_momentum", "poly_power", "seed")},
    "make_cam": {"outputs": (("cam_out_dir", "*.npy"),), "after": ("train_cam",), "lists": ("train_list",),
                 "files": ("cls_labels",), "settings": ("backbone_depth", "cam_network", "cam_scales")},
    "cam_to_ir_label": {"outputs": (("ir_label_out_dir", "*.png"),), "after": ("make_cam",), "lists": ("train_list",),
                        "files": (), "settings": ("conf_fg_thres", "conf_bg_thres", "crf_gt_prob", "crf_iters",
                                                  "crf_gauss_sxy", "crf_gauss_compat", "crf_bi_sxy", "crf_bi_srgb",
                                                  "crf_bi_compat")},
    "train_irn": {"outputs": (("irn_weights_name", None),), "after": ("train_cam", "cam_to_ir_label"),
                  "lists": ("train_list", "infer_list"), "files": ("backbone_weights",),
                  "settings": ("backbone_depth", "irn_network", "irn_crop_size", "irn_batch_size", "irn_num_epoches",
                               "irn_learning_rate", "irn_weight_decay", "irn_disp_lr_mult", "irn_backbone_from_cam",
                               "irn_train_backbone", "radius", "sgd_momentum", "poly_power", "seed")},
    "make_sem_seg": {"outputs": (("sem_seg_out_dir", "*.png"), ("score_dir", "*.pt")),
                     "after": ("make_cam", "train_irn"), "lists": ("train_list",), "files": ("cls_labels",),
                     "settings": ("backbone_depth", "irn_network", "beta", "exp_times", "rw_radius", "rw_mode",
                                  "rw_sparse_dtype", "rw_allow_tf32", "sem_seg_bg_thres", "irn_infer_pad_to",
                                  "score_fp16")},
    "gen_mask": {"outputs": (("mask_out_dir", "*.png"),), "after": ("make_sem_seg",), "lists": ("train_list",),
                 "files": ("cls_labels",), "settings": ("mask_thd", "margin_tie_mode", "no_class_mask", "seed")},
    "export": {"outputs": (("export_to", f"{PSEUDO_LABEL_DIR}/*.png"), ("export_to", f"{MASK_DIR}/*.png")),
               "after": ("make_sem_seg", "gen_mask"), "lists": ("train_list",), "files": (), "settings": ()},
}


def _output_places(args: argparse.Namespace, step: str) -> list[tuple[Path, tuple[str, ...], str]]:
    """(folder, output globs, record file name) of each place ``step`` writes to."""
    from utils.provenance import RECORD_NAME
    places = []
    for option, pattern in STEP_PROVENANCE[step]["outputs"]:
        path = Path(getattr(args, option))
        if pattern is None:  # a weights file in sess/, beside the other step's: one record each
            places.append((path.parent, (path.name,), f"_provenance.{step}.json"))
        elif step == "export":  # two folders the second stage reads, each with its own record
            folder, glob = pattern.split("/")
            places.append((path / folder, (glob,), RECORD_NAME))
        else:
            places.append((path, (pattern,), RECORD_NAME))
    return places


def _upstream_identity(args: argparse.Namespace, step: str, made: dict[str, dict]) -> dict[str, Any]:
    """An earlier step's identity: its record as this run makes it, or as its folder holds it."""
    from utils import provenance
    if step in made:
        return {"record": provenance.digest(made[step])}
    folder, globs, name = _output_places(args, step)[0]
    return provenance.folder_input(folder, globs, name)


def step_records(args: argparse.Namespace, steps: list[str]) -> dict[str, dict]:
    """The record of each chosen step (eval steps write nothing and have none), in step order,
    so a step's record holds the records its upstream steps get in this same run."""
    from utils import provenance
    root = args.coco_root if args.dataset == "coco" else args.voc12_root
    made: dict[str, dict] = {}
    for step in STEPS:
        entry = STEP_PROVENANCE.get(step)
        if entry is None or step not in steps:
            continue
        inputs = {f"step:{up}": _upstream_identity(args, up, made) for up in entry["after"]}
        for option in entry["lists"] + entry["files"]:
            value = getattr(args, option)
            inputs[option] = provenance.file_input(value) if value is not None and Path(value).is_file() else {"sha256": None}
        settings = {"dataset": args.dataset, "root": str(Path(root).resolve()), "max_images": args.max_images,
                    **{name: getattr(args, name) for name in entry["settings"]}}
        made[step] = provenance.make_record(f"run_sample.py {step}", inputs, settings)
    return made


def plan_steps(args: argparse.Namespace, steps: list[str]) -> dict[str, list]:
    """Every chosen step's output places checked before the first step runs: a step whose
    outputs were made otherwise stops the run here (OutputExistsError naming both records)."""
    from utils import provenance
    if "export" in steps and args.export_to is None:
        steps = [s for s in steps if s != "export"]  # export without a target writes nothing
    records = step_records(args, steps)
    return {step: [provenance.plan(folder, records[step], globs, overwrite=args.overwrite, record_name=name)
                   for folder, globs, name in _output_places(args, step)]
            for step in records}


def step_runner(name: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    if name == "export":
        return export
    try:
        module = importlib.import_module(STEP_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == STEP_MODULES[name]:
            raise RunError(f"step {name}: module {STEP_MODULES[name]} is not available in this checkout") from None
        raise
    return module.run


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen steps; returns each step's metrics. Every error propagates (``cli`` reports them)."""
    return run_steps(parse_args(argv), argv)


def run_steps(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    from misc.preflight import preflight
    log = setup_logging(args)
    from misc.runtime import configure_runtime
    from misc.torchutils import seed_everything
    runtime = configure_runtime(getattr(args, "determ", False), args.torch_threads)  # before any CUDA work (cuBLAS reads its env)
    seed_everything(args.seed)
    root = args.coco_root if args.dataset == "coco" else args.voc12_root
    log.info(f"run_sample: steps {','.join(args.steps)}; dataset {args.dataset} {root}; work_dir {args.work_dir}")
    log.info("run_sample: " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.backbone_weights is None and any(s in args.steps for s in ("train_cam", "train_irn")):
        log.warning("run_sample: NO --backbone_weights: the backbone trains FROM SCRATCH "
                    "(expect far lower mIoU than the reference; fine for the synthetic demo)")
    log.info("run_sample: runtime " + ", ".join(f"{k} {v}" for k, v in runtime.items() if v not in (None, {}, [])))
    record_runtime(args.summary_path, runtime)
    runners = {name: step_runner(name) for name in args.steps}  # a missing step module fails before any work
    record_preflight(args.summary_path, preflight(args, args.steps, log))
    plans = plan_steps(args, args.steps)
    results: dict[str, Any] = {}
    from utils import provenance
    for name in args.steps:
        run = runners[name]
        for plan in plans.get(name, []):  # outputs of other settings go (--overwrite) just before the step
            provenance.commit(plan)
        seed_everything(args.seed)  # each step reproducible on its own, whatever ran before
        log.info(f"== {name}")
        start = time.perf_counter()
        try:
            metrics = run(args) or {}
        except BaseException:
            for plan in plans.get(name, []):
                provenance.withdraw(plan)
            raise
        seconds = time.perf_counter() - start
        record_step(args.summary_path, name, seconds, metrics, args)
        shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        log.info(f"== {name} done in {seconds:.1f} s: {shown}")
        results[name] = metrics
    return results


def _report(message: str, code: int) -> int:
    """One line on stderr; the traceback of the error being handled into log.txt."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, f"error: {message}", None,
                                       sys.exc_info()))
    print(f"error: {message}", file=sys.stderr)
    return code


def cli(argv: list[str] | None = None) -> int:
    """The command: ``main`` with the project's errors reported in one line (exit 2 for option
    errors, 1 for data and run errors); any other exception keeps its traceback."""
    from misc.errors import error_types, exit_code, one_line, spawned_error
    try:
        args = parse_args(argv)
    except error_types() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
    try:
        run_steps(args, argv)
    except error_types() as e:
        return _report(one_line(e), exit_code(e))
    except Exception as e:
        found = spawned_error(e)  # ours, raised in a make_cam / make_sem_seg shard process
        if found is None:
            raise
        return _report(found[1], found[0])
    return 0


if __name__ == "__main__":
    sys.exit(cli())

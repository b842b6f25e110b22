"""The first stage's settings: ``configs/first_stage/<name>.yaml``, read by the second stage's loader.

One YAML file per data set holds every value (``voc.yaml``: the reference's, spec §3.1;
``coco.yaml``: COCO's differences, ``_base_: voc.yaml``; the demo's files build on them).
``FirstStageCfg`` declares the keys and their types only, so the file is the one place for a
number. A run resolves, last wins:

    the --config file (default: configs/first_stage/<--dataset>.yaml, voc without one)
    the reference's flags (--cam_num_epoches 2): aliases of the keys of the same name
    key=value overrides (cam_num_epoches=2), typed and checked as the file is

The result is the ``argparse.Namespace`` the steps read (``args.cam_num_epoches``): paths as
``Path``, lists as tuples, ``steps`` as the chosen steps in their fixed order, and the derived
paths under ``work_dir`` filled in (``resolve_paths``).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from datasets.coco import list_name
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.views import reduced_size
from utils.config import apply_overrides, build_dataclass, load_yaml
from utils.errors import OptionError

REPO = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO / "configs" / "first_stage"

STEPS: tuple[str, ...] = ("train_cam", "make_cam", "eval_cam", "cam_to_ir_label", "train_irn",
                          "make_sem_seg", "eval_sem_seg", "gen_mask", "export")


@dataclass
class FirstStageCfg:
    """The keys of a first-stage config file; their values (and meaning) are in voc.yaml."""
    dataset: Literal["voc", "coco"]
    voc12_root: str
    coco_root: str
    work_dir: str
    steps: str
    export_to: Optional[str]
    seed: int
    device: str
    num_workers: Optional[int]
    max_images: Optional[int]
    torch_threads: Optional[int]
    determ: bool
    cpu_shards: int
    overwrite: bool
    no_progress: bool
    train_list: Optional[str]
    val_list: Optional[str]
    infer_list: Optional[str]
    chainer_eval_set: str
    cls_labels: Optional[str]
    backbone_depth: Literal[18, 34, 50]
    backbone_weights: Optional[str]
    backbone_bn: Literal["fixed", "batch"]
    cam_network: str
    cam_crop_size: int
    cam_resize_long: list[int]
    cam_batch_size: int
    cam_num_epoches: int
    cam_learning_rate: float
    cam_weight_decay: float
    cam_classifier_lr_mult: float
    cam_freeze_until: Literal["stage2", "stem", "none"]
    cam_val_loss: bool
    cam_eval_thres: float
    cam_eval_sweep: list[float]
    cam_scales: list[float]
    conf_fg_thres: float
    conf_bg_thres: float
    crf_gt_prob: float
    crf_iters: int
    crf_gauss_sxy: float
    crf_gauss_compat: float
    crf_bi_sxy: float
    crf_bi_srgb: float
    crf_bi_compat: float
    irn_network: str
    irn_crop_size: int
    irn_batch_size: int
    irn_num_epoches: int
    irn_learning_rate: float
    irn_weight_decay: float
    irn_disp_lr_mult: float
    irn_backbone_from_cam: bool
    irn_train_backbone: bool
    radius: int
    rw_radius: int
    beta: int
    exp_times: int
    rw_mode: Literal["sparse", "dense"]
    rw_sparse_dtype: Literal["float64", "float32"]
    rw_allow_tf32: bool
    irn_infer_pad_to: Optional[int]
    ins_seg_bg_thres: float
    sem_seg_bg_thres: float
    score_fp16: bool
    margin_tie_mode: Literal["original", "zero"]
    mask_thd: float
    no_class_mask: Literal["random_half", "zero", "skip"]  # skip: refused (SKIP_REFUSED)
    sgd_momentum: float
    poly_power: float
    cam_weights_name: Optional[str]
    irn_weights_name: Optional[str]
    cam_out_dir: Optional[str]
    ir_label_out_dir: Optional[str]
    sem_seg_out_dir: Optional[str]
    score_dir: Optional[str]
    mask_out_dir: Optional[str]


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FirstStageCfg))
HINTS: dict[str, Any] = typing.get_type_hints(FirstStageCfg)
DATASETS: tuple[str, ...] = typing.get_args(HINTS["dataset"])
DEFAULT_DATASET = "voc"  # whose file a command line without --config or --dataset reads
# Keys the steps read as paths (backbone_weights stays the string it was given: a file name).
PATH_KEYS = ("voc12_root", "coco_root", "work_dir", "export_to", "train_list", "val_list", "infer_list",
             "cls_labels", "cam_weights_name", "irn_weights_name", "cam_out_dir", "ir_label_out_dir",
             "sem_seg_out_dir", "score_dir", "mask_out_dir")
# Output paths derived from work_dir when null.
OUTPUT_PATHS = {"cam_weights_name": ("sess", "res{depth}_cam.pth"), "irn_weights_name": ("sess", "res{depth}_irn.pth"),
                "cam_out_dir": ("result", "cam"), "ir_label_out_dir": ("result", "ir_label"),
                "sem_seg_out_dir": ("result", "sem_seg"), "score_dir": ("result", "score"),
                "mask_out_dir": ("result", "mask_irn")}


def config_path(dataset: str) -> Path:
    """The data set's own settings file: configs/first_stage/<dataset>.yaml."""
    return CONFIG_DIR / f"{dataset}.yaml"


# ----------------------------------------------------------------------------- flag types


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


def float_list(v: str) -> list[float]:
    try:
        out = [float(x) for x in v.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {v!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def int_pair(v: str) -> list[int]:
    try:
        a, b = (int(x) for x in v.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers 'MIN,MAX', got {v!r}") from None
    if a > b:
        raise argparse.ArgumentTypeError(f"MIN must be <= MAX, got {v!r}")
    return [a, b]


def optional_int(v: str) -> int | None:
    return None if v.strip().lower() in ("", "none", "null") else int(v)


def optional_float_list(v: str) -> list[float]:
    return float_list(v) if v.strip() else []


def step_list(v: str) -> list[str]:
    """Steps in their fixed order from ``all`` or a comma list."""
    if v.strip() == "all":
        return list(STEPS)
    chosen = [s.strip() for s in v.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)} or 'all'")
    return [s for s in STEPS if s in chosen]


# ----------------------------------------------------------------------------- the command line


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout."""


class _Group:
    """``add_argument`` for a settings key: its flag only overrides (no default of its own), its
    type and choices are the key's (``FirstStageCfg``), and its help ends with the values of
    voc.yaml and, where it differs, coco.yaml."""

    def __init__(self, group: argparse._ArgumentGroup, shipped: dict[str, dict]):
        self.group, self.shipped = group, shipped

    def add_argument(self, flag: str, **kw: Any) -> argparse.Action:
        key = flag[2:]
        if key not in KEYS:
            raise KeyError(f"{flag} is not a settings key")
        if "action" not in kw:
            kw.setdefault("type", _flag_type(key))
        if typing.get_origin(HINTS[key]) is Literal:
            kw["choices"] = typing.get_args(HINTS[key])
        default = self.shipped[DEFAULT_DATASET][key]
        values = [f"{name}.yaml: {_shown(raw[key])}" for name, raw in self.shipped.items()
                  if name == DEFAULT_DATASET or raw[key] != default]
        kw["help"] = f"{kw.get('help', '')} ({'; '.join(values)})".lstrip()
        return self.group.add_argument(flag, default=argparse.SUPPRESS, **kw)


def _flag_type(key: str) -> Callable[[str], Any]:
    """How a flag's text becomes the key's value (its type in ``FirstStageCfg``)."""
    hint = HINTS[key]
    if key in PATH_KEYS:
        return Path
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return {int: int, float: float, str: str, bool: str2bool, Optional[int]: optional_int,
            Optional[str]: str, list[float]: float_list, list[int]: int_pair}[hint]


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """--config, --print-config, key=value overrides and every key's flag (the reference's names)."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="settings file (default: configs/first_stage/<--dataset>.yaml, voc.yaml without one)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings overrides after the file and the flags, e.g. cam_num_epoches=2")
    shipped = {name: load_yaml(config_path(name)) for name in DATASETS}

    def add_group(title: str) -> _Group:
        return _Group(p.add_argument_group(title), shipped)

    a = add_group("run").add_argument
    a("--dataset",
      help="voc: --voc12_root (20 classes); coco: the prepared COCO 2014 tree under --coco_root (80 classes, "
           "spec §16; see the description above). Without --config it picks configs/first_stage/<dataset>.yaml")
    a("--voc12_root",
      help="VOC2012 folder (JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation); --dataset voc")
    a("--coco_root",
      help="--dataset coco: tools/prepare_coco.py's tree (train2014/, val2014/, mask/, lists/, cls_labels_*.json)")
    a("--work_dir", help="every output goes under this (created)")
    a("--steps", type=step_list, help=f"comma list of {', '.join(STEPS)}; or all")
    a("--export_to",
      help=f"export step: copy sem_seg → DIR/{PSEUDO_LABEL_DIR} and mask_irn → DIR/{MASK_DIR}")
    a("--seed", help="seeds Python, numpy, torch and loader workers (QUIRK-3 fix)")
    a("--device", help="auto (CUDA if available), cpu, cuda, cuda:N")
    a("--num_workers", help="data-loader workers and CRF processes; null: cpu_count//2")
    a("--max_images",
      help="use only the first N ids of every list (smoke runs); eval keeps eval ids among them")
    a("--torch_threads",
      help="torch intra-op CPU threads (null: torch's choice; 1 avoids OpenMP slowdowns on busy machines). "
           "Part of the result: 1 and 2 threads give different weights")
    a("--determ", action="store_const", const=True,
      help="deterministic algorithms (torch.use_deterministic_algorithms, warn only), cuDNN deterministic and "
           "benchmark off, also in make_cam / make_sem_seg shard processes: a machine then repeats its own "
           "numbers bit for bit on GPUs too (the CPU path already does). Other machines (CPU kernels, threads, "
           "library versions; summary.json \"runtime\") may still differ")
    a("--cpu_shards",
      help="make_cam / make_sem_seg on the CPU: spread the ids round-robin over this many processes "
           "(GPUs: one process per visible GPU regardless)")
    a("--overwrite", action="store_const", const=True,
      help="redo the chosen steps' outputs (default: reuse those their folder's _provenance.json says were made "
           "with the same options and inputs; outputs made otherwise are refused, naming the differences)")
    a("--no_progress", action="store_const", const=True, help="no progress bars")

    a = add_group("data").add_argument
    a("--train_list",
      help="null: <voc12_root>/ImageSets/Segmentation/train_aug.txt; COCO <coco_root>/lists/train2014.txt")
    a("--val_list",
      help="CAM validation loss; null: <voc12_root>/ImageSets/Segmentation/val.txt; COCO lists/val2014.txt")
    a("--infer_list",
      help="IRN mean-shift pass; null: <voc12_root>/ImageSets/Segmentation/train.txt; COCO lists/train2014.txt")
    a("--chainer_eval_set",
      help="evaluation split: VOC ImageSets/Segmentation/<set>.txt, GT SegmentationClass; "
           "COCO train|val: lists/<set>2014.txt, GT mask/<set>2014")
    a("--cls_labels",
      help="image-level labels JSON (datasets/voc_cls_labels format); VOC null: <voc12_root>/cls_labels.json, "
           "else Annotations/*.xml; COCO null: <coco_root>/cls_labels_<split>2014.json of each id's split "
           "(one file given here must hold every id)")

    a = add_group("backbone").add_argument
    a("--backbone_depth", help="ResNet depth (50 = reference)")
    a("--backbone_weights",
      help="torchvision ImageNet ResNet file (e.g. resnet50-19c8e357.pth); none = train from scratch (warned)")
    a("--backbone_bn",
      help="fixed = reference (running statistics, never updated); batch = ordinary BatchNorm, "
           "needed to train from scratch (the synthetic demo)")

    a = add_group("CAM (spec §3.1, §6–§9)").add_argument
    a("--cam_network", help="module exposing the CAM network's Net")
    a("--cam_crop_size", help="training crop (the reference hard-codes 512)")
    a("--cam_resize_long", help="random long-side range 'MIN,MAX'")
    a("--cam_batch_size", help="images per CAM training batch (incomplete batches are dropped)")
    a("--cam_num_epoches", help="CAM training epochs (the reference's spelling)")
    a("--cam_learning_rate", help="backbone lr at step 0 of the poly schedule")
    a("--cam_weight_decay", help="L2 weight decay of the CAM network")
    a("--cam_classifier_lr_mult", help="classifier lr = this × cam_learning_rate")
    a("--cam_freeze_until",
      help="QUIRK-17: stage2 = reference VOC/IRN network (gradients cut after layer2; also COCO's, "
           "with 80 classes), stem = ReCAM variant (only the stem frozen), none = train all")
    a("--cam_val_loss", help="print a validation loss per epoch (no effect on weights)")
    a("--cam_eval_thres", help="eval_cam: background score below which a pixel is background")
    a("--cam_eval_sweep", type=optional_float_list, help="eval_cam: also report mIoU at these thresholds")
    a("--cam_scales", help="make_cam scales, comma list")
    a("--conf_fg_thres", help="cam_to_ir_label confident-foreground threshold")
    a("--conf_bg_thres", help="cam_to_ir_label confident-background threshold")
    a("--crf_gt_prob", help="cam_to_ir_label CRF: probability given to the seed label")
    a("--crf_iters", help="CRF mean-field iterations")
    a("--crf_gauss_sxy", help="CRF smoothness kernel: spatial width (px)")
    a("--crf_gauss_compat", help="CRF smoothness kernel: weight")
    a("--crf_bi_sxy", help="CRF appearance kernel: spatial width (px)")
    a("--crf_bi_srgb", help="CRF appearance kernel: colour width")
    a("--crf_bi_compat", help="CRF appearance kernel: weight")

    a = add_group("IRN (spec §3.1, §10–§14)").add_argument
    a("--irn_network", help="module exposing IRN's networks")
    a("--irn_crop_size", help="IRN training crop")
    a("--irn_batch_size", help="images per IRN training batch (incomplete batches are dropped)")
    a("--irn_num_epoches", help="IRN training epochs")
    a("--irn_learning_rate", help="edge-branch lr at step 0 of the poly schedule")
    a("--irn_weight_decay", help="L2 weight decay of IRN")
    a("--irn_disp_lr_mult", help="displacement-branch lr = this × irn_learning_rate")
    a("--irn_backbone_from_cam",
      help="start IRN's (frozen) backbone from the trained CAM backbone (not the reference; for runs without ImageNet)")
    a("--irn_train_backbone",
      help="train IRN's backbone with the edge branch (reference: frozen); a from-scratch aid")
    a("--radius", help="IRN training path radius")
    a("--rw_radius", help="random-walk radius")
    a("--beta", help="random walk: transition weights = affinity^beta")
    a("--exp_times", help="random walk of 2^exp_times steps")
    a("--rw_mode", help="sparse propagation or the reference's dense powers")
    a("--rw_sparse_dtype", help="sparse random-walk precision")
    a("--rw_allow_tf32", help="QUIRK-2: TF32 matmuls in the dense random walk")
    a("--irn_infer_pad_to", help="QUIRK-11: pad IRN inference input to this (IRN: 512)")
    a("--ins_seg_bg_thres", help="instance steps (not part of this pipeline)")
    a("--sem_seg_bg_thres", help="make_sem_seg: background plane of the walked scores")
    a("--score_fp16", help="save score tensors as float16 (COCO parity; default float32)")
    a("--margin_tie_mode", help="QUIRK-13 gen_mask tie rule")
    a("--mask_thd", help="gen_mask keep fraction")
    a("--no_class_mask",
      help="QUIRK-15 fixed: gen_mask's full-size mask of an image without any class (COCO): random_half = "
           "int(N/(1/mask_thd)) of its N pixels (floor(N/2)), seeded by --seed and the id; zero = none; "
           "skip is refused (the second stage's list keeps the images; see the description)")

    a = add_group("optimiser (spec §18)").add_argument
    a("--sgd_momentum", help="QUIRK-20 KEEP: the reference's SGD momentum is 1e-4")
    a("--poly_power", help="lr x (1 - step/max_step)^poly_power")

    a = add_group("output paths (null: under --work_dir)").add_argument
    for name, (folder, file) in OUTPUT_PATHS.items():
        a(f"--{name}", help=f"null: <work_dir>/{folder}/{file.replace('{depth}', '<depth>')}")
    missing = set(KEYS) - {action.dest for action in p._actions}
    if missing:
        raise KeyError(f"settings keys without a flag: {sorted(missing)}")
    return p


# ----------------------------------------------------------------------------- resolving


def _yaml_value(value: Any) -> Any:
    """A flag's parsed value as the file would hold it (Path -> str; the steps list -> its text)."""
    if isinstance(value, Path):
        return str(value)
    return value


def load_settings(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> FirstStageCfg:
    """A settings file with ``key=value`` overrides, every key checked (tools/demo.py's check)."""
    cfg = build_dataclass(FirstStageCfg, apply_overrides(load_yaml(path), list(overrides)))
    check_steps(cfg.steps)
    return cfg


def resolve_config(command: argparse.Namespace) -> FirstStageCfg:
    """The settings of a parsed command line: the file, then the flags, then key=value."""
    flags = {k: _yaml_value(v) for k, v in vars(command).items() if k in KEYS}
    if isinstance(flags.get("steps"), list):
        flags["steps"] = ",".join(flags["steps"])
    overrides = list(command.overrides)
    path = command.config
    if path is None:
        named = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "dataset"]
        dataset = named[-1] if named else flags.get("dataset", DEFAULT_DATASET)
        if dataset not in DATASETS:
            raise OptionError(f"config key 'dataset': {dataset!r} is not one of {list(DATASETS)}")
        path = config_path(dataset)
    raw = load_yaml(path)
    written = raw.get("dataset")
    raw.update(flags)
    cfg = build_dataclass(FirstStageCfg, apply_overrides(raw, overrides))
    if command.config is not None and cfg.dataset != written:
        raise OptionError(f"{path} holds the settings of dataset {written!r}, not {cfg.dataset!r}: use "
                          f"{config_path(cfg.dataset)} or a file based on it (_base_)")
    check_steps(cfg.steps)
    return cfg


def check_steps(text: str) -> list[str]:
    try:
        return step_list(text)
    except argparse.ArgumentTypeError as e:
        raise OptionError(f"config key 'steps': {e}") from None


def to_namespace(cfg: FirstStageCfg) -> argparse.Namespace:
    """What the steps read: paths as Path, lists as tuples, the steps in their order, the
    worker count resolved."""
    values = dataclasses.asdict(cfg)
    for key in PATH_KEYS:
        if values[key] is not None:
            values[key] = Path(values[key])
    for key in ("cam_resize_long", "cam_eval_sweep", "cam_scales"):
        values[key] = tuple(values[key])
    values["steps"] = check_steps(cfg.steps)
    if values["num_workers"] is None:
        values["num_workers"] = max(1, (os.cpu_count() or 2) // 2)
    return argparse.Namespace(**values)


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the derived paths (QUIRK-5 fixed: one work dir, everything created)."""
    w = args.work_dir
    if args.dataset == "coco":
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
    for key, (folder, file) in OUTPUT_PATHS.items():
        if getattr(args, key) is None:
            setattr(args, key, w / folder / file.format(depth=args.backbone_depth))
    args.log_dir = w / "logs"
    args.log_name = w / "log.txt"
    args.summary_path = w / "summary.json"
    for path in (w / "sess", args.cam_out_dir, args.ir_label_out_dir, args.sem_seg_out_dir, args.score_dir,
                 args.mask_out_dir, args.log_dir, args.cam_weights_name.parent, args.irn_weights_name.parent):
        path.mkdir(parents=True, exist_ok=True)
    return args


# ----------------------------------------------------------------------------- values the types cannot check


# --no_class_mask skip: why it is refused (the export cannot leave ids out of the second stage's list).
SKIP_REFUSED = (
    "--no_class_mask skip cannot be honoured: the second stage trains on every id of its own list "
    "(VOC: ImageSets/Segmentation/train_aug.txt of the VOC root; COCO: every image of train2014/, or "
    "lists/train2014.txt with data.list_dir lists) and stops at an id without a pseudo-label and a mask, so "
    "the export cannot leave images out. Remove those ids from --train_list and from the second stage's list "
    "instead (a run lists them in <work_dir>/logs/no_class_ids.txt), or use random_half (default) or zero")


def check_options(args: argparse.Namespace) -> None:
    """Values the types cannot check; an OptionError (exit 2) names the flag."""
    at_least = {"max_images": 1, "cpu_shards": 1, "num_workers": 0, "cam_batch_size": 1, "irn_batch_size": 1,
                "cam_crop_size": 1, "irn_crop_size": 1, "cam_num_epoches": 1, "irn_num_epoches": 1}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise OptionError(f"--{name} must be >= {low}, got {value}")
    if not 0.0 < args.mask_thd <= 1.0:
        raise OptionError(f"--mask_thd must be in (0, 1], got {args.mask_thd}")
    if len(args.cam_resize_long) != 2 or args.cam_resize_long[0] > args.cam_resize_long[1]:
        raise OptionError(f"--cam_resize_long: expected MIN,MAX with MIN <= MAX, got {list(args.cam_resize_long)}")
    if not args.cam_scales:
        raise OptionError("--cam_scales: expected at least one scale")
    if args.no_class_mask == "skip":
        raise OptionError(SKIP_REFUSED)
    check_path_options(args)
    # Here, not at the top: the device and path checks import torch and the step modules, which
    # --help and a settings file's check (tools/demo.py) do without.
    from irn.misc.runtime import resolve_device
    resolve_device(args.device)  # DeviceError (an OptionError) for a device this machine lacks


def _path_reach(flag: str, radius: int) -> int:
    # The path index's own reach and its rule for the radius, so the option check cannot drift from it.
    from datasets.affinity import _reach
    try:
        return _reach(radius)
    except ValueError as e:
        raise OptionError(f"{flag}: {e}") from None


def _crop_maps(crop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(IRN's output map, its affinity labels' map) of a square training crop."""
    # The stem's and max-pool's ceil(H/4): IRN's output size, as make_cam's.
    from irn.step.make_cam import stride4_size
    return stride4_size(crop, crop), reduced_size(crop)


def _crop_works(crop: int, reach: int) -> bool:
    out, labels = _crop_maps(crop)
    # PathIndex.window: every path from a source stays inside the map, reach rows below it and
    # reach columns either side, so the map needs 2 reach + 1 columns.
    return out == labels and labels[1] >= 2 * reach + 1


def irn_crop_problem(crop: int, radius: int) -> str | None:
    """Why train_irn cannot train on ``crop`` with paths of ``radius``, naming the crops and
    radii that would; None when it can."""
    reach = _path_reach("--radius", radius)
    out, labels = _crop_maps(crop)
    if labels[1] < 2 * reach + 1:
        smallest = next(c for c in itertools.count(crop + 1) if _crop_works(c, reach))
        largest = 1  # the reach grows with the radius: the largest that fits is below the first that does not
        while largest + 1 < radius and _crop_works(crop, _path_reach("--radius", largest + 1)):
            largest += 1
        return (f"--irn_crop_size {crop} is too small for --radius {radius}: IRN trains on the crop's stride-4 map "
                f"({labels[0]}x{labels[1]}), and paths of radius {radius} need it at least {2 * reach + 1} wide; use "
                f"--irn_crop_size >= {smallest}" + (f" or --radius <= {largest}" if largest >= 2 else ""))
    if out != labels:
        below = next((c for c in range(crop - 1, 0, -1) if _crop_works(c, reach)), None)
        above = next(c for c in itertools.count(crop + 1) if _crop_works(c, reach))
        return (f"--irn_crop_size {crop}: IRN's stride-4 map of a {crop}-pixel crop is {out[0]}x{out[1]}, its "
                f"affinity labels {labels[0]}x{labels[1]} (crop/4 rounded half to even); use --irn_crop_size "
                + (f"{below} or {above}" if below else f"{above}"))
    return None


def check_path_options(args: Any) -> None:
    """The radii and the IRN crop of the steps that will run, before any step: each failed only
    in its own step (train_irn after three steps, make_sem_seg after five)."""
    if "train_irn" in args.steps:
        problem = irn_crop_problem(args.irn_crop_size, args.radius)
        if problem:
            raise OptionError(problem)
    if "make_sem_seg" in args.steps:
        _path_reach("--rw_radius", args.rw_radius)


__all__ = ["FirstStageCfg", "KEYS", "STEPS", "build_parser", "load_settings", "resolve_config", "to_namespace",
           "resolve_paths", "config_path", "str2bool", "step_list", "check_options", "irn_crop_problem", "SKIP_REFUSED"]

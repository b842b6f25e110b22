"""Typed, validated configuration.

The YAML files hold every value; the dataclasses below only declare which keys
exist and their types, so a typo or a wrong type fails at start-up with the key's
dotted name instead of surfacing hours into a run. The dataclasses carry no
defaults on purpose: a value missing from the YAML is an error, never a silent
number from the code.

Three sections are *tagged*: `data`, `model` and `optim` each name their kind
(`dataset: coco`, `name: deeplabv2`, `name: adamw`), the kind picks the dataclass
that declares the section's keys, and the kind's values come from
`configs/<section>/<name>.yaml` under whatever the config itself sets. A
config (or a `model.name=...` override) that changes the kind starts that
section afresh from the new kind's file, so keys of the old kind never leak in.

The kinds are not known here. This module is the bottom layer: the data sets
(`datasets/`), segmenters and optimisers (`models/`) and methods (`engine/`)
import its section dataclasses, so it imports none of them. Their tables reach it
as one argument, `Tables`, which `build_config` checks names against;
`engine/config.py`, above them all, gathers the tables and is where programs load
configs. The tables are the owners' plain dicts from name to entry, handed over
as they are: no registration step and no import-order effect, and each name is
written once, in its owner's table (the method names too: `method.name` is
checked against `engine/beco.py`'s table, not a second list here).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Collection, Literal, Mapping, NamedTuple, Optional, Union

import yaml

from utils.crf import CrfKernels
from utils.errors import ConfigError  # re-exported: its historical home


# The kinds' own files: configs/model/<name>.yaml, configs/optim/<name>.yaml.
SECTION_DEFAULTS_DIR = Path(__file__).resolve().parents[1] / "configs"


class Tables(NamedTuple):
    """The tables of the layers above, which a config's names are checked against. Each is
    its owner's own dict, and the fields read here are named beside it."""
    data: Mapping[str, Any]     # datasets/build.py DATASETS: data.dataset -> entry (.config, .num_classes)
    model: Mapping[str, Any]    # models/build.py MODELS: model.name -> entry (.config)
    optim: Mapping[str, Any]    # models/build.py OPTIMIZERS: optim.name -> entry (.config)
    method: Mapping[str, Any]   # engine/beco.py METHODS: method.name -> entry (.even_batch_reason)
    # models/build.py BACKBONES: model.backbone.<key> -> (family, the values the family builds)
    backbone: Mapping[str, tuple[str, Collection[Any]]]


@dataclass(frozen=True)
class Tagged:
    """Marks a section whose `key` entry picks its dataclass: `Tables.<table>[kind].config`."""
    key: str
    table: str


@dataclass(frozen=True)
class NameIn:
    """Marks a string that must be a name of `Tables.<table>`."""
    table: str


@dataclass
class SyntheticCfg:
    train: int
    val: int
    test: int
    size: list[int]
    classes: int
    seed: int
    colours: Literal["instance", "class"]  # random per object (hard) | a fixed hue per class
    colour_jitter: float   # per-instance colour shift in "class" mode
    object_scale: list[float]  # object radius range, fraction of the short side
    max_objects: int


@dataclass
class DataCfg:
    """Keys every data set has; each data set's dataclass (`datasets/<name>.py`) adds its
    file layout, and its values are in `configs/data/<name>.yaml`."""
    dataset: str
    root: str
    num_classes: int
    pseudo_label_dir: str
    mask_dir: str
    # QUIRK-S3: a pseudo-label or mask of another size than its image is an error; the
    # reference crops it with the image's box (crop_like_reference); or resize it first.
    mask_size_mismatch: Literal["error", "crop_like_reference", "resize_nearest"]
    truncated_images: Literal["error", "load"]  # load: decode what is there, as the reference does on COCO
    verify: Literal["full", "exists"]  # before training: read every file (datasets/verify.py) | existence only
    synthetic: Optional[SyntheticCfg]
    crop_size: int
    scale: list[float]
    scale_mode: Literal["rrc", "jitter"]
    ratio: list[float]
    crop_attempts: int
    flip_prob: float
    mean: list[float]
    std: list[float]
    val_size: int
    batch_size: int               # per process (and per accumulation step)
    # Images per optimiser step over all processes; when set, batch_size follows from it and the
    # number of processes (resolve_batch), so a run keeps its total on 1, 4 or 8 GPUs.
    total_batch_size: Optional[int]
    val_batch_size: int
    num_workers: int


@dataclass
class StrongAugCfg:
    enabled: bool
    color_prob: float
    contrast: list[float]
    brightness: list[float]
    hue_shift: list[float]
    saturation_shift: list[float]
    value_shift: list[float]
    gray_prob: float
    blur_prob: float
    blur_kernels: list[int]
    blur_kernel_probs: list[float]


@dataclass
class MethodCfg:
    name: Annotated[str, NameIn("method")]   # one of engine/beco.py's METHODS
    threshold: float
    warmup_epochs: int
    co_training: bool
    co_training_start_epoch: int
    mixing: bool
    mix_prob: float
    ignore_background: bool
    boundary_size: int
    w_hb: float
    w_hi: float
    w_lb: float
    w_li: float
    strong_aug: StrongAugCfg


@dataclass
class TrainCfg:
    epochs: int
    seed: int
    amp: bool
    amp_dtype: Literal["float16", "bfloat16"]  # float16 (with the gradient scaler) is the reference's
    channels_last: bool
    compile: bool
    keep_host_memory: bool
    deterministic: bool
    cudnn_benchmark: bool
    allow_tf32: bool
    log_interval: int
    val_interval: int
    grad_accum: int  # micro-batches per optimiser step (gradients summed, each loss / grad_accum)
    ckpt_interval: Optional[int]  # iterations between resumable checkpoints (null: epoch ends only)
    # Validation on a fixed, seeded subset of the val split (null: all of it).
    val_subset: Optional[int]
    val_subset_seed: int
    # QUIRK-S5: "metrics" always; "dump_logits_only" is the reference's coco_set (no metric,
    # no best checkpoint, every image's averaged pre_logits saved each validation).
    val_mode: Literal["metrics", "dump_logits_only"]
    save_val_logits: bool
    val_pad_like_ddp: bool  # QUIRK-S13: true counts the reference's padded duplicates (DDP val sampler)
    num_vis: int


@dataclass
class DistCfg:
    timeout_min: float  # how long a collective waits for the slowest rank before the run stops


@dataclass
class LoggingCfg:
    path_base: str
    tag: str
    run_id: Optional[str]


@dataclass
class CrfCfg(CrfKernels):
    legacy_image: bool
    legacy_mean: list[float]
    prob_clip: float
    prune_labels: bool
    prune_threshold: float


@dataclass
class TestCfg:
    split: Literal["val", "test", "train", "train_aug"]
    multi_scale: bool
    scales: list[float]
    flip: bool
    save_logits: bool  # off: metrics only (no CRF possible later); the reference always saves
    logits_format: Literal["dense", "compact"]  # utils/score_maps.py
    logits_dtype: Literal["float32", "float16"]
    compact_threshold: float
    compact_max_classes: int
    chunk_size: int
    card_inference: list[Literal["single", "flip", "msc", "msc+flip"]]  # results card rows (engine/results_card.py)
    crf: CrfCfg


@dataclass
class Config:
    data: Annotated[Any, Tagged("dataset", "data")]
    model: Annotated[Any, Tagged("name", "model")]
    method: MethodCfg
    optim: Annotated[Any, Tagged("name", "optim")]
    train: TrainCfg
    dist: DistCfg
    logging: LoggingCfg
    test: TestCfg


def _convert(value: Any, tp: Any, key: str, tables: Tables) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *marks = typing.get_args(tp)
        for mark in marks:
            if isinstance(mark, Tagged):
                return _build_tagged(value, mark, key, tables)
            if isinstance(mark, NameIn):
                names = list(getattr(tables, mark.table))
                # isinstance first: an unhashable value (a list) is refused by the same message.
                if not (isinstance(value, str) and value in names):
                    raise ConfigError(f"config key '{key}': {value!r} is not one of {names}")
                return value
        return _convert(value, inner, key, tables)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # type() as well as ==, so neither `true` passes for 1 nor 16.0 for 16.
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, tables)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key, tables)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", tables) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for '{key}'")


# Keys that existed before segmenters were chosen by name: their unknown-key error says where they went.
MOVED_KEYS = {
    "model.decoder.num_classes": "the class count is data.num_classes, for every segmenter",
    "model.decoder.align_corners": "it is model.align_corners now",
}


def _build(cls: type, raw: dict, prefix: str, tables: Tables) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in hints:
            key = f"{prefix}{'.' if prefix else ''}{k}"
            hint = f" ({MOVED_KEYS[key]})" if key in MOVED_KEYS else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
    values = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ConfigError(f"config key '{key}' is missing")
        values[name] = _convert(raw[name], hints[name], key, tables)
    return cls(**values)


def build_dataclass(cls: type, raw: dict, prefix: str = "") -> Any:
    """``cls`` (a dataclass of this module's kind: no defaults, and no tagged section or table
    name, so no table to check) from ``raw``: an unknown, missing or mistyped key is a
    ConfigError naming it. The first stage's settings are built with it."""
    return _build(cls, raw, prefix, Tables({}, {}, {}, {}, {}))


def section_defaults(section: str, kind: str) -> dict:
    """The values of one kind of a tagged section (`configs/model/deeplabv2.yaml`), or {}."""
    path = SECTION_DEFAULTS_DIR / section / f"{kind}.yaml"
    return load_yaml(path) if path.is_file() else {}


def _build_tagged(value: Any, tagged: Tagged, key: str, tables: Tables) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
    table = getattr(tables, tagged.table)
    tag_key = f"{key}.{tagged.key}"
    if tagged.key not in value:
        raise ConfigError(f"config key '{tag_key}' is missing (one of {sorted(table)})")
    kind = value[tagged.key]
    if kind not in table:
        raise ConfigError(f"config key '{tag_key}': {kind!r} is not one of {sorted(table)}")
    return _build(table[kind].config, _merge(section_defaults(key, kind), value), key, tables)


def tagged_sections() -> dict[str, str]:
    """Top-level section -> the key that names its kind (`{"model": "name", "optim": "name"}`)."""
    hints = typing.get_type_hints(Config, include_extras=True)
    out = {}
    for name, tp in hints.items():
        marks = typing.get_args(tp)[1:] if typing.get_origin(tp) is Annotated else ()
        for mark in marks:
            if isinstance(mark, Tagged):
                out[name] = mark.key
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _merge_config(base: dict, over: dict) -> dict:
    """`_merge` of whole configs, except that a tagged section whose kind `over`
    changes is taken from `over` alone (the new kind's file fills in the rest)."""
    out = _merge(base, over)
    for section, tag in tagged_sections().items():
        old, new = base.get(section), over.get(section)
        if isinstance(old, dict) and isinstance(new, dict) and tag in new and new[tag] != old.get(tag):
            out[section] = dict(new)
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so the value a reader sees first is not the one the run uses."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        # Before the merge keys (<<) are flattened in: a key of the mapping itself may override
        # a merged one, as YAML intends.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following ``_base_`` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    chain = (*_chain, path)
    if path.resolve() in {p.resolve() for p in _chain}:
        raise ConfigError(f"config _base_ cycle: {' -> '.join(str(p) for p in chain)}")
    with open(path) as f:
        try:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: line {e.line}: key {e.key!r} appears twice in one mapping "
                              f"(first on line {e.first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("_base_", None)
    if base is not None:
        raw = _merge_config(load_yaml(path.parent / base, chain), raw)
    return _with_section_defaults(raw)


def _with_section_defaults(raw: dict) -> dict:
    """Each tagged section's kind file under the section's own values, so that
    overrides of nested keys (``model.backbone.depth=50``) find their place."""
    out = dict(raw)
    for section, tag in tagged_sections().items():
        value = raw.get(section)
        if isinstance(value, dict) and isinstance(value.get(tag), str):
            out[section] = _merge(section_defaults(section, value[tag]), value)
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``).

    An override that changes a tagged section's kind (``model.name=segformer``) applies
    first, wherever it stands, and starts that section afresh, so the section's other
    overrides refine the new kind."""
    raw = _merge(raw, {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    kind_keys = {f"{section}.{tag}" for section, tag in tagged_sections().items()}
    overrides = sorted(overrides, key=lambda o: o.split("=", 1)[0].strip() not in kind_keys)
    for item in overrides:
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        value = _parse_override_value(item, text)
        if ".".join(parts) in kind_keys:
            section = raw.get(parts[0])
            if not isinstance(section, dict) or section.get(parts[1]) != value:
                raw[parts[0]] = section_defaults(parts[0], str(value))  # a new kind starts from its own values
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and part in node:
                child = node[part] = {}  # e.g. data.synthetic.train=8 when synthetic is null
            if not isinstance(child, dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}' in override '{item}'")
            node = child
        node[parts[-1]] = value
    return raw


def _parse_override_value(item: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML: {e}") from e
    # YAML reads 1e-4 (no dot) as a string; accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return value


def upgrade_legacy(raw: dict) -> dict:
    """A config written before segmenters and optimisers were chosen by name (a run's
    saved ``config.yaml``) in today's layout: its model is DeepLabV3+, whose class count
    now comes from ``data.num_classes`` and whose ``align_corners`` moved up a level,
    and its optimiser is SGD."""
    raw = dict(raw)
    model = raw.get("model")
    if isinstance(model, dict) and "name" not in model and isinstance(model.get("decoder"), dict) \
            and "num_classes" in model["decoder"]:
        decoder = {k: v for k, v in model["decoder"].items() if k not in ("num_classes", "align_corners")}
        model = {"name": "deeplabv3plus", **model, "decoder": decoder}
        if "align_corners" in raw["model"]["decoder"]:
            model["align_corners"] = raw["model"]["decoder"]["align_corners"]
        raw["model"] = model
    optim = raw.get("optim")
    if isinstance(optim, dict) and "name" not in optim and "momentum" in optim:
        raw["optim"] = {"name": "sgd", **optim}
    # Keys added since (COCO and the compact score maps): the reference config's values, read
    # from its file; the data section's from its data set's file (configs/data/<name>.yaml).
    reference = None
    for section, keys in ADDED_KEYS.items():
        # A whole section only when it came later itself; a config without `data` is an error.
        missing = section not in raw and section in ADDED_SECTIONS
        if missing or isinstance(raw.get(section), dict) and any(k not in raw[section] for k in keys):
            reference = reference or load_yaml(REFERENCE_CONFIG)
            raw[section] = {**{k: reference[section][k] for k in keys}, **(raw.get(section) or {})}
    return _with_section_defaults(raw)


# Keys a run's saved config.yaml may lack because they came later (upgrade_legacy fills them).
ADDED_KEYS = {
    "train": ("val_subset", "val_subset_seed", "val_mode", "save_val_logits", "ckpt_interval",
              "val_pad_like_ddp", "amp_dtype", "channels_last", "compile", "keep_host_memory", "grad_accum"),
    "test": ("save_logits", "logits_format", "compact_threshold", "compact_max_classes"),
    "data": ("total_batch_size",),
    "dist": ("timeout_min",),
}
ADDED_SECTIONS = ("dist",)
REFERENCE_CONFIG = SECTION_DEFAULTS_DIR / "beco_voc.yaml"


def build_config(raw: dict, tables: Tables) -> Config:
    cfg = _build(Config, upgrade_legacy(raw), "", tables)
    check_consistency(cfg, tables)
    return cfg


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _probability(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


# np.random.seed's range: train.seed seeds numpy's global generator in every process and loader
# worker (utils/runtime.set_seed, datasets/segmentation.seed_worker_fn); the other seeds feed
# np.random.default_rng, which takes any integer >= 0.
NUMPY_SEED_MAX = 2**32 - 1

# Keys whose values have a meaning only in a range: checked with the config, so a setting
# outside it stops at start-up naming the key, not later with PyTorch's or Python's text.
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    *((k, _probability, "a probability in [0, 1]") for k in (
        "method.threshold", "method.mix_prob", "data.flip_prob", "method.strong_aug.color_prob",
        "method.strong_aug.gray_prob", "method.strong_aug.blur_prob")),
    *((k, _positive, "> 0") for k in (
        "optim.lr", "optim.poly_power", "data.crop_size", "data.val_size", "data.batch_size",
        "data.val_batch_size", "data.crop_attempts", "train.epochs", "train.val_interval", "train.log_interval",
        "train.grad_accum", "dist.timeout_min")),
    *((k, _non_negative, ">= 0") for k in (
        "optim.min_lr", "optim.weight_decay", "data.num_workers", "method.warmup_epochs",
        "method.co_training_start_epoch", "method.boundary_size", "method.w_hb", "method.w_hi", "method.w_lb",
        "method.w_li", "train.num_vis", "train.val_subset_seed", "data.synthetic.seed")),
    ("train.seed", lambda v: 0 <= v <= NUMPY_SEED_MAX, f"in [0, {NUMPY_SEED_MAX}]"),
    ("train.ckpt_interval", lambda v: v is None or v >= 1, ">= 1 or null (only at epoch ends)"),
    ("data.total_batch_size", lambda v: v is None or v >= 1, ">= 1 or null (data.batch_size per process)"),
    ("data.scale", lambda v: all(x > 0 for x in v), "all > 0"),
    ("data.ratio", lambda v: all(x > 0 for x in v), "all > 0"),
    ("data.std", lambda v: all(x > 0 for x in v), "all > 0"),
    ("test.scales", lambda v: all(x > 0 for x in v), "all > 0"),
)


def check_consistency(cfg: Config, tables: Tables) -> None:
    """Value ranges (``RANGES``) and rules that span keys: caught here so a bad setting fails
    before training."""
    for key, ok, meaning in RANGES:
        try:
            value = _value(cfg, key)
        except AttributeError:  # a key of another kind of a tagged section (e.g. AdamW has no momentum)
            continue
        if not ok(value):
            raise ConfigError(f"config key '{key}': must be {meaning}, got {value!r}")
    if hasattr(cfg.optim, "momentum") and not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"config key 'optim.momentum': must be in [0, 1), got {cfg.optim.momentum}")
    if cfg.optim.head_lr_mult is not None and cfg.optim.head_lr_mult <= 0:
        raise ConfigError(f"config key 'optim.head_lr_mult': must be > 0 or null, got {cfg.optim.head_lr_mult}")
    if cfg.optim.min_lr > cfg.optim.lr:
        # The schedule's floor is the factor min_lr / lr of every group's own lr (the head's
        # head_lr_mult x lr too): above 1 it holds every step at the floor, never decaying.
        raise ConfigError(f"config key 'optim.min_lr': {cfg.optim.min_lr:g} is above optim.lr {cfg.optim.lr:g}, so "
                          f"the poly schedule would train at the floor throughout; must be <= optim.lr")
    if hasattr(cfg.optim, "betas") and (len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas)):
        raise ConfigError(f"config key 'optim.betas': expected two values in [0, 1), got {cfg.optim.betas}")
    if hasattr(cfg.optim, "eps") and cfg.optim.eps < 0:
        raise ConfigError(f"config key 'optim.eps': must be >= 0, got {cfg.optim.eps}")
    _check_backbone(cfg.model, tables.backbone)
    even_batch_reason = tables.method[cfg.method.name].even_batch_reason
    if even_batch_reason and cfg.data.batch_size % 2:
        raise ConfigError(f"config key 'data.batch_size': {even_batch_reason}, so it must be even")
    for key, pair in (("data.ratio", cfg.data.ratio), ("method.strong_aug.contrast", cfg.method.strong_aug.contrast)):
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"config key '{key}': expected [low, high]")
    if len(cfg.data.scale) < 2:
        raise ConfigError("config key 'data.scale': needs at least two entries")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("config keys 'data.mean'/'data.std': need three values (RGB)")
    sa = cfg.method.strong_aug
    if len(sa.blur_kernels) != len(sa.blur_kernel_probs) or abs(sum(sa.blur_kernel_probs) - 1) > 1e-6:
        raise ConfigError("config key 'method.strong_aug.blur_kernel_probs': one probability per "
                          "kernel, summing to 1")
    _check_blur_kernels(cfg)
    syn = cfg.data.synthetic
    if syn is not None and len(syn.size) != 2:
        raise ConfigError("config key 'data.synthetic.size': expected [height, width]")
    if syn is not None and (len(syn.object_scale) != 2 or not 0 < syn.object_scale[0] <= syn.object_scale[1]):
        raise ConfigError("config key 'data.synthetic.object_scale': expected [low, high] with 0 < low <= high")
    entry = tables.data[cfg.data.dataset]
    if entry.num_classes is not None and cfg.data.num_classes != entry.num_classes:
        raise ConfigError(f"config key 'data.num_classes': {cfg.data.dataset} has {entry.num_classes} classes "
                          f"(background included), got {cfg.data.num_classes}")
    if entry.num_classes is None and syn is not None and syn.classes + 1 != cfg.data.num_classes:
        raise ConfigError(f"config key 'data.synthetic.classes' ({syn.classes} foreground classes) needs "
                          f"'data.num_classes' = {syn.classes + 1} (background included), got {cfg.data.num_classes}")
    if not 0 <= cfg.test.compact_threshold < 1:
        raise ConfigError(f"config key 'test.compact_threshold': must be in [0, 1), got {cfg.test.compact_threshold}")
    if cfg.test.compact_max_classes < 1:
        raise ConfigError(f"config key 'test.compact_max_classes': must be >= 1, got {cfg.test.compact_max_classes}")
    t = cfg.train
    if t.val_subset is not None and t.val_subset < 1:
        raise ConfigError(f"config key 'train.val_subset': must be >= 1 or null (all), got {t.val_subset}")
    if t.val_mode == "dump_logits_only" and cfg.data.val_batch_size != 1:
        raise ConfigError("config key 'train.val_mode': dump_logits_only saves one map per image and needs "
                          "data.val_batch_size 1")
    _check_path_base(cfg.logging.path_base)


def _check_blur_kernels(cfg: Config) -> None:
    """Every kernel is built whenever strong augmentation is on (engine/strong_aug.py), and the
    blur pads each crop by half the largest kernel with reflection, which needs the crop wider
    than that half."""
    sa, key = cfg.method.strong_aug, "method.strong_aug.blur_kernels"
    for k in sa.blur_kernels:
        if k < 1 or k % 2 == 0:
            raise ConfigError(f"config key '{key}': a Gaussian kernel size must be odd and >= 1, got {k}")
    crop = cfg.data.crop_size
    widest = max(sa.blur_kernels, default=1)
    if sa.enabled and sa.blur_prob > 0 and widest // 2 >= crop:
        raise ConfigError(f"config key '{key}': kernel {widest} reaches {widest // 2} pixels beyond its centre, "
                          f"which the {crop}-pixel crops (data.crop_size) cannot reflect; use kernels <= {2 * crop - 1}")


def _check_backbone(model: Any, backbones: Mapping[str, tuple[str, Collection[Any]]]) -> None:
    backbone = getattr(model, "backbone", None)
    for key, (family, table) in backbones.items():
        value = getattr(backbone, key, None)
        if value is not None and value not in table:
            raise ConfigError(f"config key 'model.backbone.{key}': {value!r} is not a {family} {key}; "
                              f"one of {sorted(table)}")


def _check_path_base(path_base: str) -> None:
    """Run folders are made under ``logging.path_base`` (engine.build.run_dir_for, and --test's
    engine/inference.test_run_dir): a file there, or on the way to it, stops the run only when
    the folder is made."""
    path = Path(path_base)
    for parent in (path, *path.parents):
        if parent.exists():
            if parent.is_dir():
                return
            where = "is a file, not a folder" if parent == path else f"lies under {parent}, which is a file"
            raise ConfigError(f"config key 'logging.path_base': {path} {where}")


def resolve_batch(cfg: Config, world_size: int, tables: Tables) -> Config:
    """``data.batch_size`` from ``data.total_batch_size`` when that is set: total / (processes x
    ``train.grad_accum``). A total that does not split evenly is refused with the totals and
    process counts that would; so is a ``train.seed`` whose per-process and loader-worker
    seeds pass numpy's bound (the other check that needs the process count). Returns ``cfg``
    (changed in place)."""
    _check_derived_seeds(cfg, world_size)
    total, accum = cfg.data.total_batch_size, cfg.train.grad_accum
    if total is None:
        return cfg
    share = world_size * accum
    if total % share:
        lower, upper = total // share * share, (total // share + 1) * share
        counts = [n for n in range(1, total + 1) if total % (n * accum) == 0] if total % accum == 0 else []
        raise ConfigError(
            f"config key 'data.total_batch_size': {total} images do not split evenly over {world_size} "
            f"process(es) x {accum} accumulation step(s) (train.grad_accum); use a total of "
            f"{' or '.join(str(t) for t in (lower, upper) if t > 0)}"
            + (f", or run {', '.join(map(str, counts))} process(es)" if counts else "")
            + ", or another train.grad_accum")
    per_process = total // share
    even_batch_reason = tables.method[cfg.method.name].even_batch_reason
    if even_batch_reason and per_process % 2:
        raise ConfigError(f"config key 'data.total_batch_size': {total} images over {world_size} process(es) x "
                          f"{accum} accumulation step(s) gives {per_process} per process, and {even_batch_reason}, "
                          f"so it must be even")
    cfg.data.batch_size = per_process
    return cfg


def _check_derived_seeds(cfg: Config, world_size: int) -> None:
    """Process r seeds numpy with train.seed + r and its loader worker w with train.seed +
    workers x r + w: past numpy's bound the process fails, the worker hangs the run."""
    seed, workers = cfg.train.seed, cfg.data.num_workers
    offset = max(world_size, workers * world_size) - 1
    if seed + offset > NUMPY_SEED_MAX:
        loaders = f" x {workers} loader worker(s) (data.num_workers)" if workers else ""
        raise ConfigError(f"config key 'train.seed': {seed} gives {world_size} process(es){loaders} seeds up to "
                          f"{seed + offset}, past numpy's {NUMPY_SEED_MAX}; use at most {NUMPY_SEED_MAX - offset}")


def load_config(path: str | Path, overrides: list[str] | None, tables: Tables) -> Config:
    return build_config(apply_overrides(load_yaml(path), overrides or []), tables)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings with one-line lists, the layout of the files in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)

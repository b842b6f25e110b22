"""Typed, validated configuration.

The YAML files hold every value; the dataclasses below only declare which keys
exist and their types, so a typo or a wrong type fails at start-up with the key's
dotted name instead of surfacing hours into a run. The dataclasses carry no
defaults on purpose: a value missing from the YAML is an error, never a silent
number from the code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class SyntheticCfg:
    train: int
    val: int
    test: int
    size: list[int]
    classes: int
    seed: int
    colours: str           # instance (random per object, hard) | class (fixed hue per class)
    colour_jitter: float   # per-instance colour shift in "class" mode
    object_scale: list[float]  # object radius range, fraction of the short side
    max_objects: int


@dataclass
class DataCfg:
    dataset: str
    root: str
    num_classes: int
    aug: bool
    image_dir: str
    gt_dir: str
    list_dir: str
    pseudo_label_dir: str
    mask_dir: str
    val_split: str
    synthetic: Optional[SyntheticCfg]
    crop_size: int
    scale: list[float]
    scale_mode: str
    ratio: list[float]
    crop_attempts: int
    flip_prob: float
    mean: list[float]
    std: list[float]
    val_size: int
    batch_size: int
    val_batch_size: int
    num_workers: int


@dataclass
class BackboneCfg:
    depth: int
    output_stride: int
    multi_grid: list[int]
    contract_dilation: bool
    norm_layer: str
    pretrained: Optional[str]


@dataclass
class DecoderCfg:
    num_classes: int
    aspp_channels: int
    aspp_dilations: list[int]
    low_level_channels: int
    dropout: float
    norm_layer: str
    align_corners: bool


@dataclass
class ModelCfg:
    backbone: BackboneCfg
    decoder: DecoderCfg


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
    name: str
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
class OptimCfg:
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float
    min_lr: float


@dataclass
class TrainCfg:
    epochs: int
    seed: int
    amp: bool
    deterministic: bool
    cudnn_benchmark: bool
    allow_tf32: bool
    log_interval: int
    val_interval: int
    num_vis: int


@dataclass
class LoggingCfg:
    path_base: str
    tag: str
    run_id: Optional[str]


@dataclass
class CrfCfg:
    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    legacy_image: bool
    legacy_mean: list[float]
    prob_clip: float
    prune_labels: bool
    prune_threshold: float


@dataclass
class TestCfg:
    split: str
    multi_scale: bool
    scales: list[float]
    flip: bool
    logits_dtype: str
    chunk_size: int
    crf: CrfCfg


@dataclass
class Config:
    data: DataCfg
    model: ModelCfg
    method: MethodCfg
    optim: OptimCfg
    train: TrainCfg
    logging: LoggingCfg
    test: TestCfg


# Values a key may take, where a free string would let a typo through.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("voc",),
    "data.synthetic.colours": ("instance", "class"),
    "data.scale_mode": ("rrc", "jitter"),
    "model.backbone.norm_layer": ("BN", "SyncBN", "GN"),
    "model.decoder.norm_layer": ("BN", "SyncBN", "GN"),
    "method.name": ("beco", "baseline"),
    "test.split": ("val", "test", "train", "train_aug"),
    "test.logits_dtype": ("float32", "float16"),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
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


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in hints:
            raise ConfigError(f"unknown config key '{prefix}{'.' if prefix else ''}{k}'")
    values = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ConfigError(f"config key '{key}' is missing")
        values[name] = _convert(raw[name], hints[name], key)
        if key in CHOICES and values[name] not in CHOICES[key]:
            raise ConfigError(f"config key '{key}': {values[name]!r} is not one of {list(CHOICES[key])}")
    return cls(**values)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config, following ``_base_`` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("_base_", None)
    if base is not None:
        raw = _merge(load_yaml(path.parent / base), raw)
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    raw = _merge(raw, {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and part in node:
                child = node[part] = {}  # e.g. data.synthetic.train=8 when synthetic is null
            if not isinstance(child, dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}' in override '{item}'")
            node = child
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
        node[parts[-1]] = value
    return raw


def build_config(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: Config) -> None:
    """Rules that span keys: caught here so a bad combination fails before training."""
    if cfg.model.decoder.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"config keys 'model.decoder.num_classes' ({cfg.model.decoder.num_classes}) and "
            f"'data.num_classes' ({cfg.data.num_classes}) disagree")
    if cfg.model.backbone.output_stride not in (8, 16):
        raise ConfigError("config key 'model.backbone.output_stride': must be 8 or 16")
    if cfg.method.name == "beco" and cfg.data.batch_size % 2:
        raise ConfigError("config key 'data.batch_size': BECO mixes batch halves, so it must be even")
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
    syn = cfg.data.synthetic
    if syn is not None and len(syn.size) != 2:
        raise ConfigError("config key 'data.synthetic.size': expected [height, width]")
    if syn is not None and (len(syn.object_scale) != 2 or not 0 < syn.object_scale[0] <= syn.object_scale[1]):
        raise ConfigError("config key 'data.synthetic.object_scale': expected [low, high] with 0 < low <= high")
    if syn is not None and syn.classes + 1 != cfg.data.num_classes:
        raise ConfigError(f"config key 'data.synthetic.classes' ({syn.classes} foreground classes) needs "
                          f"'data.num_classes' = {syn.classes + 1} (background included), got {cfg.data.num_classes}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    return build_config(apply_overrides(load_yaml(path), overrides or []))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings with one-line lists, the layout of the files in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)

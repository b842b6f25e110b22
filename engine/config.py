"""Loading a run's config: `utils/config.py`'s loader with the tables it checks names against.

`utils/config.py` is the bottom layer and knows no data set, segmenter, optimiser or
method; the layers that own them import its section dataclasses. This module sits
above all of them, so it is the one that hands their tables to the loader. Programs,
tools and tests load configs through the three functions here; everything else
(`Config`, `ConfigError`, `load_yaml`, `to_yaml`, ...) comes from `utils/config.py`.
"""
from __future__ import annotations

from pathlib import Path

from datasets.build import DATASETS
from engine.beco import METHODS
from models.build import BACKBONES, MODELS, OPTIMIZERS
from utils import config
from utils.config import Config, Tables

TABLES = Tables(data=DATASETS, model=MODELS, optim=OPTIMIZERS, method=METHODS, backbone=BACKBONES)


def build_config(raw: dict) -> Config:
    """The validated config of a raw mapping (a YAML file's, with its `_base_` chain resolved)."""
    return config.build_config(raw, TABLES)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The validated config of a YAML file and ``key=value`` overrides."""
    return config.load_config(path, overrides, TABLES)


def resolve_batch(cfg: Config, world_size: int) -> Config:
    """`utils.config.resolve_batch`: ``data.batch_size`` from ``data.total_batch_size``."""
    return config.resolve_batch(cfg, world_size, TABLES)

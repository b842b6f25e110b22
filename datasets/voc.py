"""PASCAL VOC 2012 (and the synthetic VOC-format set) as a data set of this project: its
config keys and where its files are (spec second-stage §1).

    <root>/<image_dir>/<id>.jpg     <root>/<gt_dir>/<id>.png (palette, 255 = void)
    <root>/<list_dir>/<split>.txt   train_aug (SBD-augmented), train, val, test
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets.readers import SplitFiles, read_split
from utils.config import DataCfg


@dataclass
class VocDataCfg(DataCfg):
    aug: bool                # train on train_aug (SBD-augmented) instead of train
    image_dir: str
    gt_dir: str
    list_dir: str
    val_split: str


def train_split(cfg: VocDataCfg) -> str:
    return "train_aug" if cfg.aug else "train"


def files(cfg: VocDataCfg, split: str) -> SplitFiles:
    root = Path(cfg.root)
    return SplitFiles(read_split(root / cfg.list_dir, split), root / cfg.image_dir, root / cfg.gt_dir)

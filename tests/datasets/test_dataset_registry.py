"""Adding a data set: one entry in ``datasets/build.py``'s table plus its data config.

A toy third data set, a VOC-format tree with 3 classes registered under another name by a
fixture, is read by both stages without touching their code: the first stage's views
(``datasets/views.py``) and the second stage's data sets (``datasets/segmentation.py``).
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import REPO, write_tiny_voc
from datasets import build, voc
from datasets.affinity import PathIndex
from datasets.build import DatasetEntry
from datasets.prepare.cls_labels import LabelError
from datasets.segmentation import EvalSet, TrainSet
from datasets.sources import VOCSource
from datasets.views import AffinityView, ClassificationView, GroundTruthView, data_source, open_source
from engine.config import load_config

TOY_CLASSES = ("background", "circle", "square", "triangle")
TRAIN = ["t_0001", "t_0002", "t_0003", "t_0004"]
VAL = ["v_0001", "v_0002"]


def _no_generator(root: Path, syn: object, overwrite: bool = False) -> dict:
    raise AssertionError("the toy data set has no synthetic generator")


# The whole registration: what a new VOC-format data set adds to datasets/build.py's table.
TOY_ENTRY = DatasetEntry(voc.VocDataCfg, voc.files, voc.train_split, TOY_CLASSES, 255, len(TOY_CLASSES),
                         _no_generator, "synthetic_toy.json", None,
                         first_stage=VOCSource, first_stage_root="toy_root")


def _toy_data_config(root: Path) -> dict:
    """What configs/data/toy.yaml would hold: the shared keys plus the toy's layout."""
    common = yaml.safe_load((REPO / "configs/data/common.yaml").read_text())
    return {**common, "dataset": "toy", "root": str(root), "num_classes": len(TOY_CLASSES), "aug": True,
            "image_dir": "VOC2012/JPEGImages", "gt_dir": "VOC2012/SegmentationClass",
            "list_dir": "VOC2012/ImageSets/Segmentation", "val_split": "val", "truncated_images": "error",
            "crop_size": 32, "val_size": 32}


def _write_annotations(tree: Path, ids: list[str]) -> dict[str, list[int]]:
    """VOC XML naming the toy's classes present in each ground truth; returns id -> CAM indices."""
    (tree / "Annotations").mkdir(exist_ok=True)
    present = {}
    for i in ids:
        gt = np.asarray(Image.open(tree / "SegmentationClass" / f"{i}.png"))
        present[i] = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
        objects = "".join(f"<object><name>{TOY_CLASSES[k + 1]}</name></object>" for k in present[i])
        (tree / "Annotations" / f"{i}.xml").write_text(f"<annotation>{objects}</annotation>")
    return present


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy tree, registered as data set "toy" for this test only."""
    monkeypatch.setitem(build.DATASETS, "toy", TOY_ENTRY)
    root = write_tiny_voc(tmp_path / "toy", TRAIN, VAL, size=(40, 48))
    return root


def test_the_first_stage_reads_a_registered_voc_format_set(toy):
    tree = toy / "VOC2012"
    present = _write_annotations(tree, TRAIN)
    src = open_source("toy", tree)
    assert (src.name, src.num_classes, src.num_labels, src.gt_ignore) == ("toy", 3, 4, 255)
    assert src.ids("train") == TRAIN and src.ids("val") == VAL
    assert src.describe() == f"TOY {tree} (3 classes)"

    # CAM training: multi-hot over the entry's 3 classes, read from XML with the entry's names.
    cls = ClassificationView(TRAIN, src, crop_size=32, crop_method="top_left")
    for k, i in enumerate(TRAIN):
        item = cls[k]
        assert item["name"] == i and tuple(item["img"].shape) == (3, 32, 32)
        assert item["label"].dtype == torch.float32 and np.flatnonzero(item["label"].numpy()).tolist() == present[i]

    # IRN training on seeds (the pseudo-labels stand in): pairs on the reduced 8x8 crop.
    aff = AffinityView(TRAIN, toy / "irn_pseudo_label", 32, src, PathIndex(2), crop_method="top_left")
    item = aff[0]
    assert item["label"].shape == (32, 32) and aff.num_valid == 4
    total = item["aff_bg_pos_label"] + item["aff_fg_pos_label"] + item["aff_neg_label"]
    assert torch.equal(total, torch.ones_like(total))  # every seed value is a known class

    # Evaluation: the ground truth with 255 -> -1, values within the 4 labels.
    gt = GroundTruthView(VAL, src)[0]
    assert gt.dtype == np.int64 and set(np.unique(gt).tolist()) <= {-1, 0, 1, 2, 3}

    # The driver's options name the root through the entry (first_stage_root).
    args = Namespace(dataset="toy", toy_root=tree, chainer_eval_set="val", max_images=2, cls_labels=None,
                     train_list=None, val_list=None, infer_list=None)
    run_src = data_source(args)
    assert isinstance(run_src, VOCSource) and run_src.ids("train") == TRAIN[:2] and run_src.ids("eval") == []


def test_the_toy_class_names_are_the_entrys(toy):
    """A VOC class name in a toy annotation is unknown: the XML is read with the toy's names."""
    tree = toy / "VOC2012"
    _write_annotations(tree, TRAIN)
    (tree / "Annotations" / f"{TRAIN[0]}.xml").write_text("<annotation><object><name>person</name></object>"
                                                          "</annotation>")
    with pytest.raises(LabelError, match=rf"'{TRAIN[0]}' names unknown class 'person'"):
        open_source("toy", tree).labels(TRAIN[0])


def test_the_second_stage_builds_the_registered_set(toy, tmp_path):
    config = tmp_path / "beco_toy.yaml"
    config.write_text(yaml.safe_dump({"_base_": str(REPO / "configs/beco_voc.yaml"), "data": _toy_data_config(toy)}))
    cfg = load_config(config)
    assert cfg.data.dataset == "toy" and type(cfg.data) is voc.VocDataCfg
    train = TrainSet(cfg.data)
    assert train.ids == TRAIN  # aug: train_aug.txt
    item = train[0]
    assert tuple(item["image"].shape) == (3, 32, 32) and tuple(item["label"].shape) == (32, 32)
    assert int(item["label"].max()) < len(TOY_CLASSES)
    val = EvalSet(cfg.data, "val")
    assert val.ids == VAL and set(torch.unique(val[0]["label"]).tolist()) <= {0, 1, 2, 3, 255}
    assert build.dataset_entry("toy").class_names(cfg.data.num_classes) == list(TOY_CLASSES)


def test_an_unregistered_name_is_refused_naming_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown data set 'toy'; known: \['coco', 'voc'\]"):
        open_source("toy", ".")
    assert "toy" not in build.DATASETS

"""The data-set table: a data set is its file (config keys, file layout), its YAML
(``configs/data/<name>.yaml``) and one line here. Training, testing, ``test.py`` and the
demo look data sets up by ``data.dataset``; none of them names one. The config loader
checks ``data.dataset`` against this table, which ``engine/config.py`` hands to it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datasets import coco, voc
from datasets.readers import SplitFiles
from datasets.sources import CocoSource, DataSource, VOCSource
from utils.voc import VOC_CLASSES


# The generators are imported when a synthetic set is made, not with the table: they import
# torch and OpenCV, and test.py reads this table at start-up (its --help stays fast).
def _make_synthetic_voc(root: Path, syn: Any, overwrite: bool = False) -> dict:
    from datasets.synthetic.voc import make_synthetic_voc_from_config
    return make_synthetic_voc_from_config(root, syn, overwrite=overwrite)


def _make_synthetic_coco(root: Path, syn: Any, overwrite: bool = False) -> dict:
    from datasets.synthetic.coco import make_synthetic_coco_from_config
    return make_synthetic_coco_from_config(root, syn, overwrite=overwrite)


@dataclass(frozen=True)
class DatasetEntry:
    config: type                                   # the `data` section's keys for this data set
    files: Callable[[Any, str], SplitFiles]        # (data config, split) -> that split's files
    train_split: Callable[[Any], str]
    classes: tuple[str, ...]                       # label id -> name
    gt_ignore_index: int | None                    # void value of the ground truth (None: every pixel counts)
    num_classes: int | None                        # fixed class count (None: set by the config, e.g. synthetic VOC)
    make_synthetic: Callable[..., dict]            # (root, data.synthetic, overwrite=False): the embedded set
    synthetic_summary: str                         # the generator's summary file under data.root
    submission_dir: str | None                     # evaluation-server layout of test predictions (None: none)
    # The first stage (datasets/views.py): its source class (the layout of the files, VOC or
    # COCO, read with `classes` and `gt_ignore_index`) and its option that names the root.
    first_stage: Callable[..., DataSource]
    first_stage_root: str

    def class_names(self, num_classes: int) -> list[str]:
        """Names of the first ``num_classes`` labels (the synthetic VOC set uses the first K+1)."""
        names = list(self.classes[:num_classes])
        return names + [f"class_{k}" for k in range(len(names), num_classes)]


DATASETS: dict[str, DatasetEntry] = {
    "voc": DatasetEntry(voc.VocDataCfg, voc.files, voc.train_split, VOC_CLASSES, 255, None,
                        _make_synthetic_voc, "synthetic_voc.json",
                        "results/VOC2012/Segmentation/comp6_test_cls",
                        first_stage=VOCSource, first_stage_root="voc12_root"),
    "coco": DatasetEntry(coco.CocoDataCfg, coco.files, coco.train_split, coco.COCO_CLASSES, None, coco.NUM_CLASSES,
                         _make_synthetic_coco, "synthetic_coco.json", None,
                         first_stage=CocoSource, first_stage_root="coco_root"),
}


def dataset_entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]

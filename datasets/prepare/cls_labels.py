"""Image-level class labels of VOC images, from the XML annotations (first-stage spec §4.1).

A class is present in an image if any ``<object><name>`` of its annotation equals the
class name — difficult and truncated objects included, as the reference's
``cls_labels.npy`` was made. We store our own format instead of the reference's
integer-keyed pickle (QUIRK-8): a JSON file

    {"format": "beco-cls-labels-v1",
     "classes": ["aeroplane", ..., "tvmonitor"],          # CAM index order
     "labels": {"2007_000032": [0, 14], ...}}           # 0-based CAM indices, ascending

keyed by the string id. ``multi_hot`` turns an entry into the float32 vector of length 20
the CAM network trains on.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable

import numpy as np

from utils.errors import DataError
from utils.io import save_json
from utils.voc import VOC_CLASSES

FORMAT = "beco-cls-labels-v1"
FG_CLASSES: tuple[str, ...] = VOC_CLASSES[1:]  # CAM index k = label id - 1
DEFAULT_NAME = "cls_labels.json"


class LabelError(DataError):
    """A missing or malformed annotation/label file; the message names the id and path."""


def classes_in_xml(path: str | Path, item_id: str | None = None,
                   class_names: tuple[str, ...] = FG_CLASSES) -> list[int]:
    """Ascending 0-based indices of the classes named by any ``<object>`` in a VOC XML file."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise LabelError(f"annotation missing for id '{item_id or path.stem}': {path}") from None
    except ET.ParseError as e:
        raise LabelError(f"annotation for id '{item_id or path.stem}' is not valid XML: {path} ({e})") from None
    index = {name: k for k, name in enumerate(class_names)}
    present: set[int] = set()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise LabelError(f"annotation for id '{item_id or path.stem}' names unknown class '{name}': {path}")
        present.add(index[name])
    return sorted(present)


def labels_from_xml(annotation_dir: str | Path, ids: Iterable[str],
                    class_names: tuple[str, ...] = FG_CLASSES) -> dict[str, list[int]]:
    annotation_dir = Path(annotation_dir)
    return {i: classes_in_xml(annotation_dir / f"{i}.xml", i, class_names) for i in ids}


def save_cls_labels(path: str | Path, labels: dict[str, list[int]],
                    class_names: tuple[str, ...] = FG_CLASSES) -> Path:
    data = {"format": FORMAT, "classes": list(class_names),
            "labels": {k: [int(c) for c in labels[k]] for k in sorted(labels)}}
    return save_json(path, data)


def load_cls_labels(path: str | Path) -> dict[str, list[int]]:
    """id -> ascending 0-based class indices, from a file written by ``save_cls_labels``."""
    import json
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"class-label file not found: {path} (make it with tools/prepare_voc_aug.py)")

    def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # json.loads keeps the last of two equal keys: the other entry would vanish silently.
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise LabelError(f"id '{key}' appears twice in {path}")
            seen[key] = value
        return seen

    data = json.loads(path.read_text(), object_pairs_hook=unique_keys)
    if data.get("format") != FORMAT:
        raise LabelError(f"{path} is not a {FORMAT} class-label file")
    return {str(k): [int(c) for c in v] for k, v in data["labels"].items()}


def multi_hot(indices: Iterable[int], num_classes: int = len(FG_CLASSES)) -> np.ndarray:
    vec = np.zeros(num_classes, dtype=np.float32)
    vec[list(indices)] = 1.0
    return vec


class ClassLabels:
    """Image-level labels for a VOC root: the JSON file when given/present, else the XML files.

    Lookups of ids missing from the file fall back to the XML so a partial file never
    silently gives an all-zero label.
    """

    def __init__(self, voc12_root: str | Path, labels_file: str | Path | None = None,
                 class_names: tuple[str, ...] = FG_CLASSES):
        self.root = Path(voc12_root)
        self.class_names = tuple(class_names)  # the XML's names, in CAM index order
        self.num_classes = len(self.class_names)
        path = Path(labels_file) if labels_file else self.root / DEFAULT_NAME
        if labels_file and not path.is_file():
            raise LabelError(f"class-label file not found: {path}")
        self.table: dict[str, list[int]] = load_cls_labels(path) if path.is_file() else {}
        self.source = str(path) if path.is_file() else str(self.root / "Annotations")

    def indices(self, item_id: str) -> list[int]:
        if item_id not in self.table:
            self.table[item_id] = classes_in_xml(self.root / "Annotations" / f"{item_id}.xml", item_id,
                                                 self.class_names)
        return self.table[item_id]

    def vector(self, item_id: str) -> np.ndarray:
        return multi_hot(self.indices(item_id), self.num_classes)


__all__ = ["FORMAT", "FG_CLASSES", "DEFAULT_NAME", "LabelError", "classes_in_xml", "labels_from_xml",
           "save_cls_labels", "load_cls_labels", "multi_hot", "ClassLabels"]

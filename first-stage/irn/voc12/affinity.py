"""The affinity dataset variant (spec §4.4, §11.2): IRN training samples.

A segmentation sample (image + ir_label, jointly scaled/flipped/cropped) whose label is then
reduced to the stride-4 size with PIL nearest (pixel 4i+2 of a 512 crop) and turned into the
three pair-label maps of the path index: background-positive, foreground-positive and negative
pairs, each float32 (n_dirs, N_src).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from datasets.affinity import PathIndex, affinity_labels
from voc12.dataloader import TorchvisionNormalize, VOC12SegmentationDataset, rescale
from voc12.source import DataSource, VOCSource

LABEL_REDUCTION = 0.25  # stride 4 of the IRN outputs
VOC_NUM_VALID = VOCSource.num_labels  # former constant: label ids below this count as known (0..20)


def reduced_size(crop_size: int) -> tuple[int, int]:
    """Size of the reduced label of a crop: numpy-rounded crop/4 (512 → 128)."""
    s = int(np.round(crop_size * LABEL_REDUCTION))
    return s, s


class VOC12AffinityDataset(VOC12SegmentationDataset):
    """Segmentation items + ``aff_bg_pos_label``, ``aff_fg_pos_label``, ``aff_neg_label``.

    ``path_index`` fixes the directions; the flattened indices are those of the reduced crop.
    ``num_valid``: label ids below it are known; default the source's label count (VOC 21,
    COCO 81), so 255 (and, for VOC, 21..254) is unknown.
    """

    def __init__(self, id_list: str | Path | Sequence[str], label_dir: str | Path, crop_size: int,
                 source: DataSource | str | Path, path_index: PathIndex, num_valid: int | None = None,
                 rescale: tuple[float, float] | None = None,
                 img_normal: TorchvisionNormalize | None = TorchvisionNormalize(), hor_flip: bool = False,
                 crop_method: str = "random"):
        super().__init__(id_list, label_dir, crop_size, source, rescale=rescale, img_normal=img_normal,
                         hor_flip=hor_flip, crop_method=crop_method)
        self.path_index = path_index
        self.num_valid = self.source.num_labels if num_valid is None else int(num_valid)
        # Raises early (naming the sizes) if the crop is too small for the radius.
        self.indices = path_index.indices(reduced_size(crop_size))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        out = super().__getitem__(idx)
        label = rescale(out["label"], LABEL_REDUCTION, 0)  # PIL nearest: samples 4i+2
        bg_pos, fg_pos, neg = affinity_labels(torch.from_numpy(np.array(label)), self.indices,
                                              self.num_valid)
        out["aff_bg_pos_label"] = bg_pos
        out["aff_fg_pos_label"] = fg_pos
        out["aff_neg_label"] = neg
        return out


__all__ = ["VOC12AffinityDataset", "reduced_size", "LABEL_REDUCTION", "VOC_NUM_VALID"]

"""Pseudo-label 255 (void) meets the confidence mask before training (issue 25): accepted under
mask 0 (an unreliable pixel without a class), refused under mask 1 by datasets/verify.py with
the ids, files, pixel counts and what to do, and by the loader on every read (``data.verify:
exists``). The step's side is tests/engine/test_void_labels.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.readers import VOID_UNDER_RELIABLE_ADVICE, DataError
from datasets.segmentation import TrainSet
from datasets.verify import REPORT_NAME, verify
from tests.conftest import tiny_config, write_tiny_voc

TRAIN = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]
VAL = ["2008_000001"]
H, W = 40, 56


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_tiny_voc(tmp_path / "data", TRAIN, VAL, size=(H, W))


def _pseudo(root: Path, i: str) -> Path:
    return root / "irn_pseudo_label" / f"{i}.png"


def _mask(root: Path, i: str) -> Path:
    return root / "irn_mask" / f"{i}.png"


def _label(root: Path, i: str) -> np.ndarray:
    return np.asarray(Image.open(_pseudo(root, i)))


def _reliable(root: Path, i: str) -> np.ndarray:
    return np.asarray(Image.open(_mask(root, i)))[..., 0] > 0


def _void(root: Path, i: str, where: np.ndarray) -> None:
    """Label 255 on ``where``, the mask left as it is."""
    Image.fromarray(np.where(where, 255, _label(root, i)).astype(np.uint8), mode="L").save(_pseudo(root, i))


def _unreliable(root: Path, i: str, where: np.ndarray) -> None:
    m = np.where(where, 0, _reliable(root, i) * 255).astype(np.uint8)
    Image.fromarray(np.stack([m] * 3, -1)).save(_mask(root, i))


def _run(root: Path, *overrides: str) -> dict:
    return verify(TrainSet(tiny_config(root, *overrides).data), progress=False)


def _stripe(rows: slice) -> np.ndarray:
    out = np.zeros((H, W), bool)
    out[rows] = True
    return out


def test_void_under_mask_0_is_accepted_and_cached(voc):
    band = _stripe(slice(10, 20))
    for i in TRAIN[:2]:
        _unreliable(voc, i, band)
        _void(voc, i, band)
    summary = _run(voc)
    assert summary["labelled_fraction"] == pytest.approx(1 - 2 * band.sum() / (4 * H * W))
    assert _run(voc)["files_read"] == 0  # the pair's check is cached with the label
    assert TrainSet(tiny_config(voc).data).load(0)[0] == TRAIN[0]  # the loader's own check agrees


def test_void_under_mask_1_is_refused_naming_ids_files_and_pixels(voc):
    band = _stripe(slice(10, 20))
    counts = {}
    for i in TRAIN[1:4]:
        _void(voc, i, band)
        counts[i] = int((band & _reliable(voc, i)).sum())
    assert all(counts.values())
    with pytest.raises(DataError) as e:
        _run(voc)
    lines = [f"id '{i}': {n} pixels are labelled 255 (void) in {_pseudo(voc, i)} but marked reliable in {_mask(voc, i)}"
             for i, n in counts.items()]
    assert str(e.value) == (
        f"3 of 4 training samples are bad: {'; '.join(lines)} (full list in {voc / REPORT_NAME}). Label 255 (void) "
        f"under mask 1 (reliable): {sum(counts.values())} pixels in 3 of 4 samples, ids "
        f"{', '.join(TRAIN[1:4])}; {VOID_UNDER_RELIABLE_ADVICE}")
    assert "tools/import_labels.py" in VOID_UNDER_RELIABLE_ADVICE
    assert (voc / REPORT_NAME).read_text().splitlines()[1:] == lines
    # Marking them unreliable is the fix; the refused labels were never cached, so they are read again.
    for i in TRAIN[1:4]:
        _unreliable(voc, i, band)
    assert _run(voc)["files_read"] == 6  # three labels and their (changed) masks


def test_a_mask_changed_later_has_the_void_pixels_checked_again(voc):
    band = _stripe(slice(0, 5))
    _unreliable(voc, TRAIN[0], band)
    _void(voc, TRAIN[0], band)
    assert _run(voc)["files_read"] == 12
    # The label is unchanged, the mask now marks one of its void pixels reliable: the cached
    # label does not hide it.
    m = np.zeros((H, W), np.uint8)
    m[2, 3] = 255
    Image.fromarray(np.stack([m] * 3, -1)).save(_mask(voc, TRAIN[0]))
    with pytest.raises(DataError, match=f"id '{TRAIN[0]}': 1 pixels are labelled 255"):
        _run(voc)


def test_the_loader_refuses_it_on_read_with_verify_exists(voc):
    band = _stripe(slice(30, 40))
    _void(voc, TRAIN[2], band)
    n = int((band & _reliable(voc, TRAIN[2])).sum())
    data = TrainSet(tiny_config(voc, "data.verify=exists").data)
    assert verify(data, progress=False)["ids"] == 0  # exists: no file is read before training
    with pytest.raises(DataError) as e:
        data[2]
    assert str(e.value) == (f"id '{TRAIN[2]}': {n} pixels are labelled 255 (void) in {_pseudo(voc, TRAIN[2])} but "
                            f"marked reliable in {_mask(voc, TRAIN[2])}; {VOID_UNDER_RELIABLE_ADVICE}")
    data[0]  # the others load


def test_masks_of_another_size_are_compared_as_training_aligns_them(voc):
    """``resize_nearest``: both at the image's size; ``crop_like_reference``: the common top-left part."""
    i = TRAIN[0]
    label = np.full((H, W), 1, np.uint8)
    label[:, W // 2:] = 255  # right half void
    Image.fromarray(label, mode="L").save(_pseudo(voc, i))
    half = np.zeros((H // 2, W // 2), np.uint8)
    half[:, : W // 4] = 255  # the left half reliable, at half size
    Image.fromarray(np.stack([half] * 3, -1)).save(_mask(voc, i))
    assert _run(voc, "data.mask_size_mismatch=resize_nearest")["ids"] == 4
    # Cropped from the top-left, the small mask's reliable part lies over labelled pixels too.
    assert _run(voc, "data.mask_size_mismatch=crop_like_reference")["ids"] == 4
    half[:, :] = 255  # all reliable: resized, it covers the void half
    Image.fromarray(np.stack([half] * 3, -1)).save(_mask(voc, i))
    with pytest.raises(DataError, match=f"id '{i}': {H * W // 2} pixels are labelled 255"):
        _run(voc, "data.mask_size_mismatch=resize_nearest")
    assert _run(voc, "data.mask_size_mismatch=crop_like_reference")["ids"] == 4  # covers columns < W/2 only

"""data.verify: every file's content is checked before training, all bad files reported at
once, supervision that cannot train refused, and the per-file cache (datasets/verify.py)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.coco import stem_of
from datasets.readers import DataError, read_image
from datasets.segmentation import EvalSet, TrainSet
from datasets.verify import CACHE_NAME, REPORT_NAME, verify
from tests.conftest import tiny_coco_config, tiny_config, write_tiny_coco, write_tiny_voc

TRAIN = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]
VAL = ["2008_000001", "2008_000002"]


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_tiny_voc(tmp_path / "data", TRAIN, VAL)


def _train(root: Path, *overrides: str) -> TrainSet:
    return TrainSet(tiny_config(root, *overrides).data)


def _val(root: Path, *overrides: str) -> EvalSet:
    return EvalSet(tiny_config(root, *overrides).data, "val")


def _run(dataset, **kw) -> dict:
    return verify(dataset, progress=False, **kw)


def _error(dataset, **kw) -> str:
    with pytest.raises(DataError) as e:
        _run(dataset, **kw)
    return str(e.value)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _report_tail(root: Path) -> str:
    return f" (full list in {root / REPORT_NAME})"


def _pseudo(root: Path, i: str) -> Path:
    return root / "irn_pseudo_label" / f"{i}.png"


def _mask(root: Path, i: str) -> Path:
    return root / "irn_mask" / f"{i}.png"


# ----------------------------------------------------------------------------- per-file content

def test_a_clean_set_passes_and_counts_every_file(voc):
    summary = _run(_train(voc))
    assert {k: summary[k] for k in ("mode", "split", "ids", "files", "files_read", "files_cached")} == {
        "mode": "full", "split": "train", "ids": 4, "files": 12, "files_read": 12, "files_cached": 0}
    masks = [np.asarray(Image.open(_mask(voc, i)))[..., 0] > 0 for i in TRAIN]
    assert summary["kept_fraction"] == pytest.approx(sum(m.sum() for m in masks) / sum(m.size for m in masks))
    assert summary["labelled_fraction"] == 1.0  # conftest's pseudo-labels have no 255
    val = _run(_val(voc))
    assert (val["split"], val["ids"], val["files"], val["files_read"], val["kept_fraction"]) == ("val", 2, 4, 4, None)
    no_gt = _run(EvalSet(tiny_config(voc).data, "val", with_labels=False), split="test")
    assert (no_gt["split"], no_gt["files"], no_gt["files_read"]) == ("test", 2, 0)  # images already cached


def test_a_truncated_val_image_is_found_before_training(voc):
    path = voc / "VOC2012/JPEGImages/2008_000002.jpg"
    _truncate(path)
    with pytest.raises(DataError) as reader:
        read_image(path, "2008_000002")
    assert str(reader.value).startswith(f"image for id '2008_000002' is unreadable or truncated: {path} (")
    assert _error(_val(voc)) == f"1 of 2 validation samples are bad: {reader.value}" + _report_tail(voc)


def test_truncated_images_load_on_coco_and_fail_when_asked(tmp_path):
    root = write_tiny_coco(tmp_path / "coco", [9, 25], [42, 73])
    stem = stem_of("val", 73)
    _truncate(root / "val2014" / f"{stem}.jpg")
    summary = verify(EvalSet(tiny_coco_config(root).data, "val"), progress=False)  # truncated_images: load
    assert (summary["ids"], summary["files_read"]) == (2, 4)
    strict = EvalSet(tiny_coco_config(root, "data.truncated_images=error").data, "val")
    message = _error(strict)  # a pass under "load" is cached for "load" only: the image is read again
    assert message.startswith(f"1 of 2 validation samples are bad: image for id '{stem}' is unreadable or "
                              f"truncated: {root / 'val2014' / stem}.jpg (")
    assert message.endswith(_report_tail(root))


def test_val_ground_truth_with_a_bad_value(voc):
    gt = voc / "VOC2012/SegmentationClass/2008_000001.png"
    arr = np.asarray(Image.open(gt)).copy()
    arr[5, 7] = 21
    Image.fromarray(arr, mode="L").save(gt)
    assert _error(_val(voc)) == (f"1 of 2 validation samples are bad: ground truth for id '2008_000001' has values "
                                 f"[21] outside 0..3 and 255: {gt}" + _report_tail(voc))


def test_coco_ground_truth_has_no_void_value(tmp_path):
    root = write_tiny_coco(tmp_path / "coco", [9], [42])
    gt = root / "mask/val2014/42.png"
    arr = np.asarray(Image.open(gt)).copy()
    arr[0, 0] = 255
    Image.fromarray(arr, mode="L").save(gt)
    message = _error(EvalSet(tiny_coco_config(root).data, "val"))
    assert message == (f"1 of 1 validation samples are bad: ground truth for id '{stem_of('val', 42)}' has values "
                       f"[255] outside 0..80: {gt}" + _report_tail(root))


def test_a_mask_of_another_size(voc):
    i = TRAIN[2]
    Image.fromarray(np.full((10, 14, 3), 255, np.uint8)).save(_mask(voc, i))
    image = voc / f"VOC2012/JPEGImages/{i}.jpg"
    assert _error(_train(voc)) == (f"1 of 4 training samples are bad: id '{i}': {_mask(voc, i)} is 14x10 but "
                                   f"{image} is 56x40 (width x height)" + _report_tail(voc))
    # The policies that handle a mismatch accept it (the files themselves are cached: no read).
    for policy in ("resize_nearest", "crop_like_reference"):
        summary = _run(_train(voc, f"data.mask_size_mismatch={policy}"))
        assert (summary["ids"], summary["files_read"]) == (4, 0)
    # ... and the cache does not hide it when the policy is `error` again.
    assert _error(_train(voc)).startswith(f"1 of 4 training samples are bad: id '{i}': {_mask(voc, i)} is 14x10")


def test_val_ground_truth_of_another_size_is_always_an_error(voc):
    gt = voc / "VOC2012/SegmentationClass/2008_000002.png"
    Image.fromarray(np.zeros((40, 50), np.uint8), mode="L").save(gt)
    image = voc / "VOC2012/JPEGImages/2008_000002.jpg"
    assert _error(_val(voc, "data.mask_size_mismatch=resize_nearest")) == (
        f"1 of 2 validation samples are bad: id '2008_000002': {gt} is 50x40 but {image} is 56x40 "
        f"(width x height)" + _report_tail(voc))


def test_a_jpeg_compressed_mask_is_refused(voc):
    i = TRAIN[1]
    buf = io.BytesIO()
    Image.open(_mask(voc, i)).convert("L").save(buf, format="JPEG", quality=75)
    _mask(voc, i).write_bytes(buf.getvalue())  # JPEG bytes under the .png name: PIL reads the content
    assert len(np.unique(np.asarray(Image.open(_mask(voc, i))))) > 2
    message = _error(_train(voc))
    assert message.startswith(f"1 of 4 training samples are bad: confidence mask for id '{i}' has values [0, ")
    assert message.endswith(f"not a binary 0/1 or 0/255 mask (JPEG-compressed? a pseudo-label?): {_mask(voc, i)}"
                            + _report_tail(voc))


def test_a_pseudo_label_given_as_a_mask_is_refused(voc):
    i = TRAIN[0]
    _mask(voc, i).write_bytes(_pseudo(voc, i).read_bytes())
    assert _error(_train(voc)) == (f"1 of 4 training samples are bad: confidence mask for id '{i}' has values "
                                   f"[0, 1, 2, 3], not a binary 0/1 or 0/255 mask (JPEG-compressed? a "
                                   f"pseudo-label?): {_mask(voc, i)}" + _report_tail(voc))


# ----------------------------------------------------------------------------- all bad files at once

def test_every_bad_file_is_reported(voc):
    _truncate(voc / f"VOC2012/JPEGImages/{TRAIN[0]}.jpg")
    arr = np.zeros((40, 56), np.uint8)
    arr[1, 2] = 9
    Image.fromarray(arr, mode="L").save(_pseudo(voc, TRAIN[1]))
    _mask(voc, TRAIN[1]).write_bytes(_pseudo(voc, TRAIN[0]).read_bytes())  # the same sample's second problem
    Image.new("L", (50, 40)).save(_pseudo(voc, TRAIN[3]))
    expected_label = (f"pseudo-label for id '{TRAIN[1]}' has values [9] outside 0..3 and 255: "
                      f"{_pseudo(voc, TRAIN[1])}")
    expected_mask = (f"confidence mask for id '{TRAIN[1]}' has values [0, 1, 2, 3], not a binary 0/1 or 0/255 mask "
                     f"(JPEG-compressed? a pseudo-label?): {_mask(voc, TRAIN[1])}")
    expected_size = (f"id '{TRAIN[3]}': {_pseudo(voc, TRAIN[3])} is 50x40 but "
                     f"{voc / 'VOC2012/JPEGImages' / TRAIN[3]}.jpg is 56x40 (width x height)")
    for jobs in (1, 2):  # the same message and report, in split order, however the work is spread
        message = _error(_train(voc), jobs=jobs)
        first, rest = message.split("; ", 1)
        assert first.startswith(f"3 of 4 training samples are bad: image for id '{TRAIN[0]}' is unreadable or "
                                f"truncated: {voc / 'VOC2012/JPEGImages' / TRAIN[0]}.jpg (")
        assert rest == f"{expected_label}; {expected_mask} (and 1 more; full list in {voc / REPORT_NAME})"
        lines = (voc / REPORT_NAME).read_text().splitlines()
        assert lines[0] == "# data.verify: 3 of 4 training samples are bad (4 problems; split 'train'), one a line:"
        assert lines[1] == first.split("bad: ", 1)[1]
        assert lines[2:] == [expected_label, expected_mask, expected_size]


def test_a_fixed_file_passes_and_only_it_is_read_again(voc):
    path = voc / f"VOC2012/JPEGImages/{TRAIN[2]}.jpg"
    good = path.read_bytes()
    _truncate(path)
    assert _error(_train(voc)).startswith(f"1 of 4 training samples are bad: image for id '{TRAIN[2]}'")
    path.write_bytes(good)
    summary = _run(_train(voc))
    assert (summary["files_read"], summary["files_cached"]) == (1, 11)


# ----------------------------------------------------------------------------- supervision as a whole

def test_all_confidence_masks_empty(voc):
    for i in TRAIN:
        Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(_mask(voc, i))
    assert _error(_train(voc)) == (
        f"no pixel is marked reliable in any of the 4 confidence masks under {voc / 'irn_mask'}: every mask is "
        f"all 0, so nothing would be trained as reliable; is data.mask_dir (irn_mask) the first stage's mask output?")
    Image.fromarray(np.full((40, 56), 1, np.uint8), mode="L").save(_mask(voc, TRAIN[3]))  # one 0/1 mask: enough
    summary = _run(_train(voc))
    assert summary["kept_fraction"] == 0.25 and summary["files_read"] == 1


def test_all_pseudo_labels_void(voc):
    for i in TRAIN:
        Image.fromarray(np.full((40, 56), 255, np.uint8), mode="L").save(_pseudo(voc, i))
    assert _error(_train(voc)) == (
        f"every one of the 4 pseudo-labels under {voc / 'irn_pseudo_label'} is entirely 255 (void), so there is no "
        f"target to train on; is data.pseudo_label_dir (irn_pseudo_label) the first stage's pseudo-label output?")
    arr = np.full((40, 56), 255, np.uint8)
    arr[:4, :] = 2
    Image.fromarray(arr, mode="L").save(_pseudo(voc, TRAIN[0]))
    # Void is accepted where the mask is 0 (tests/datasets/test_void_labels.py has the rule).
    for i in TRAIN:
        Image.fromarray(np.where(arr == 255, 0, 255).astype(np.uint8) if i == TRAIN[0] else np.zeros_like(arr),
                        mode="L").save(_mask(voc, i))
    assert _run(_train(voc))["labelled_fraction"] == pytest.approx(4 * 56 / (4 * 40 * 56))


# ----------------------------------------------------------------------------- the cache

def test_a_rerun_reads_nothing_and_a_touched_file_is_read_again(voc):
    assert _run(_train(voc))["files_read"] == 12
    again = _run(_train(voc))
    assert (again["files_read"], again["files_cached"], again["jobs"]) == (0, 12, 0)
    cache = json.loads((voc / CACHE_NAME).read_text())
    mask = _mask(voc, TRAIN[1])
    st = mask.stat()
    assert cache["dirs"][str(voc / "irn_mask")][mask.name] == f"{st.st_size} {st.st_mtime_ns} mask 56 40 " \
        f"{int(np.count_nonzero(np.asarray(Image.open(mask))[..., 0]))}"
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = _run(_train(voc))
    assert (touched["files_read"], touched["files_cached"]) == (1, 11)
    assert _run(_train(voc))["files_read"] == 0


def test_a_changed_file_is_never_hidden_by_the_cache(voc):
    _run(_train(voc))
    i = TRAIN[3]
    st = _mask(voc, i).stat()
    _mask(voc, i).write_bytes(_pseudo(voc, i).read_bytes())
    os.utime(_mask(voc, i), ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _error(_train(voc)).startswith(f"1 of 4 training samples are bad: confidence mask for id '{i}' has values")
    assert _error(_train(voc)).startswith("1 of 4 training samples are bad")  # a bad file is never cached


def test_a_corrupt_cache_is_ignored_and_rewritten(voc):
    (voc / CACHE_NAME).write_text('{"version": 1, "dirs": {')
    assert _run(_train(voc))["files_read"] == 12
    assert json.loads((voc / CACHE_NAME).read_text())["version"] == 1
    assert _run(_train(voc))["files_read"] == 0
    (voc / CACHE_NAME).write_text('{"version": 0, "dirs": {}}')  # an older format: read everything again
    assert _run(_train(voc))["files_read"] == 12


def test_exists_skips_the_content(voc):
    _truncate(voc / f"VOC2012/JPEGImages/{TRAIN[0]}.jpg")
    summary = _run(_train(voc, "data.verify=exists"))
    assert summary == {"mode": "exists", "split": "train", "ids": 0, "files": 0, "files_read": 0,
                       "files_cached": 0, "jobs": 0, "seconds": 0.0, "kept_fraction": None,
                       "labelled_fraction": None}
    assert not (voc / CACHE_NAME).exists()
    assert _error(_train(voc)).startswith(f"1 of 4 training samples are bad: image for id '{TRAIN[0]}'")

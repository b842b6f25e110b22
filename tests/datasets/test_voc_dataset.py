"""VOC loaders: sample contents, mask formats and every bad-input error (spec second-stage §1-§2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.readers import DataError, read_mask, read_split
from datasets.segmentation import EvalSet as VOCEvalSet, TrainSet as VOCTrainSet, seed_worker_fn
from tests.conftest import NUM_CLASSES, tiny_config

TRAIN_ID = "2007_000002"


def test_train_samples(tiny_voc):
    ds = VOCTrainSet(tiny_config(tiny_voc).data)
    assert len(ds) == 4
    item = ds[1]
    assert item["id"] == TRAIN_ID
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert item["mask"].shape == (32, 32) and set(item["mask"].unique().tolist()) <= {0, 1}
    assert int(item["label"].max()) < NUM_CLASSES
    # aug off -> the train list (first half of train_aug)
    assert len(VOCTrainSet(tiny_config(tiny_voc, "data.aug=false").data)) == 2


def test_eval_samples_keep_original_size(tiny_voc):
    ds = VOCEvalSet(tiny_config(tiny_voc).data, "val")
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert item["size"].tolist() == [40, 56]
    assert 255 in item["label"].unique().tolist()
    no_gt = VOCEvalSet(tiny_config(tiny_voc).data, "val", with_labels=False)[0]
    assert "label" not in no_gt


@pytest.mark.parametrize("kind", ["rgb255", "l255", "l01", "p01"])
def test_mask_formats_read_the_same(tmp_path, kind):
    bits = (np.arange(20 * 30).reshape(20, 30) % 3 == 0).astype(np.uint8)
    path = tmp_path / "m.png"
    if kind == "rgb255":
        Image.fromarray(np.stack([bits * 255] * 3, -1)).save(path)
    elif kind == "l255":
        Image.fromarray(bits * 255, mode="L").save(path)
    elif kind == "l01":
        Image.fromarray(bits, mode="L").save(path)
    else:
        img = Image.fromarray(bits, mode="L").convert("P")
        img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        img.save(path)
    assert np.array_equal(np.asarray(read_mask(path, "x")), bits)


def _break(root, what):
    voc = root / "VOC2012"
    if what == "missing image dir":
        for f in (voc / "JPEGImages").iterdir():
            f.unlink()
        (voc / "JPEGImages").rmdir()
    elif what == "missing split list":
        (voc / "ImageSets/Segmentation/train_aug.txt").unlink()
    elif what == "empty split":
        (voc / "ImageSets/Segmentation/train_aug.txt").write_text("\n")
    elif what == "missing image":
        (voc / "JPEGImages" / f"{TRAIN_ID}.jpg").unlink()
    elif what == "missing pseudo-label":
        (root / "irn_pseudo_label" / f"{TRAIN_ID}.png").unlink()
    elif what == "missing mask":
        (root / "irn_mask" / f"{TRAIN_ID}.png").unlink()
    elif what == "size mismatch":
        Image.new("L", (50, 40)).save(root / "irn_pseudo_label" / f"{TRAIN_ID}.png")
    elif what == "bad label value":
        arr = np.zeros((40, 56), np.uint8)
        arr[3, 4] = 17
        Image.fromarray(arr, mode="L").save(root / "irn_pseudo_label" / f"{TRAIN_ID}.png")
    elif what == "rgb label":
        Image.new("RGB", (56, 40)).save(root / "irn_pseudo_label" / f"{TRAIN_ID}.png")
    elif what == "truncated image":
        p = voc / "JPEGImages" / f"{TRAIN_ID}.jpg"
        p.write_bytes(p.read_bytes()[:300])
    elif what == "not an image":
        (voc / "JPEGImages" / f"{TRAIN_ID}.jpg").write_text("hello")


@pytest.mark.parametrize("what, message", [
    ("missing image dir", "image directory not found: {root}/VOC2012/JPEGImages"),
    ("missing split list", "split list not found: {root}/VOC2012/ImageSets/Segmentation/train_aug.txt"),
    ("empty split", "split list is empty: {root}/VOC2012/ImageSets/Segmentation/train_aug.txt"),
    ("missing image", f"image missing for id '{TRAIN_ID}': {{root}}/VOC2012/JPEGImages/{TRAIN_ID}.jpg"),
    ("missing pseudo-label", f"pseudo-label missing for id '{TRAIN_ID}': {{root}}/irn_pseudo_label/{TRAIN_ID}.png"),
    ("missing mask", f"confidence mask missing for id '{TRAIN_ID}': {{root}}/irn_mask/{TRAIN_ID}.png"),
    ("size mismatch", f"id '{TRAIN_ID}': {{root}}/irn_pseudo_label/{TRAIN_ID}.png is 50x40 but"),
    ("bad label value", f"pseudo-label for id '{TRAIN_ID}' has values [17] outside 0..3 and 255"),
    ("rgb label", f"pseudo-label for id '{TRAIN_ID}' must be a single-channel"),
    ("truncated image", f"image for id '{TRAIN_ID}' is unreadable or truncated: {{root}}/VOC2012/JPEGImages/{TRAIN_ID}.jpg"),
    ("not an image", f"image for id '{TRAIN_ID}' is unreadable or truncated"),
])
def test_bad_training_input_names_id_and_file(tiny_voc, what, message):
    _break(tiny_voc, what)
    with pytest.raises(DataError) as e:
        ds = VOCTrainSet(tiny_config(tiny_voc).data)
        ds[1]
    assert message.format(root=tiny_voc) in str(e.value)


def test_bad_validation_label_names_id(tiny_voc):
    gt = tiny_voc / "VOC2012/SegmentationClass/2008_000002.png"
    Image.fromarray(np.full((40, 56), 21, np.uint8), mode="L").save(gt)
    ds = VOCEvalSet(tiny_config(tiny_voc).data, "val")
    ds[0]
    with pytest.raises(DataError, match=r"ground truth for id '2008_000002' has values \[21\]"):
        ds[1]
    gt.unlink()
    with pytest.raises(DataError, match="ground truth missing for id '2008_000002'"):
        VOCEvalSet(tiny_config(tiny_voc).data, "val")


def test_read_split_keeps_ids_as_strings(tmp_path):
    (tmp_path / "train.txt").write_text("2007_000032\n\n2008_000123 extra\n")
    assert read_split(tmp_path, "train") == ["2007_000032", "2008_000123"]


def test_worker_seeding_follows_the_reference_formula():
    """The worker init seeds by the reference's formula and leaves SIGTERM to the main process.
    It runs here, in the pytest process: the SIGTERM disposition is put back afterwards."""
    import random
    import signal
    previous = signal.getsignal(signal.SIGTERM)
    try:
        seed_worker_fn(seed=3223, rank=1, num_workers=4)(2)
        a = (np.random.rand(), random.random())
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    np.random.seed(4 * 1 + 2 + 3223)
    random.seed(4 * 1 + 2 + 3223)
    assert a == (np.random.rand(), random.random())


def test_works_with_a_dataloader(tiny_voc):
    ds = VOCTrainSet(tiny_config(tiny_voc).data)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert batch["id"] == ["2007_000001", TRAIN_ID]

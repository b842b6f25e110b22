"""COCO 2014 in the second stage: naming, listing, the data sets' samples and errors, the
mask-size rule (QUIRK-S2, S3), the schedule numbers (S4) and the config (spec segmenters-and-coco §2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from datasets import transforms
from datasets.coco import coco_files, gt_name, image_id_of, stem_of
from datasets.readers import DataError
from datasets.segmentation import EvalSet, TrainSet, val_subset_ids
from tests.conftest import COCO_LABELS, tiny_coco_config, write_tiny_coco
from utils.config import ConfigError

TRAIN, VAL = [9, 25, 30, 110], [42, 73, 139]


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return write_tiny_coco(tmp_path / "coco", TRAIN, VAL, grey=25)


def test_names_follow_the_reference_both_ways():
    """Oracle 6 (segmenters-and-coco §8): COCO_val2014_000000000042.jpg -> GT 42.png, maps by stem."""
    assert stem_of("val", 42) == "COCO_val2014_000000000042"
    assert gt_name("COCO_val2014_000000000042") == "42.png"
    assert stem_of("train", 9) == "COCO_train2014_000000000009"
    assert image_id_of("COCO_train2014_000000000009") == 9
    with pytest.raises(ValueError, match="not a COCO 2014 file stem"):
        image_id_of("2007_000032")


def test_listing_is_sorted_jpgs_and_ignores_other_files(coco):
    (coco / "val2014" / "notes.txt").write_text("x")
    files = coco_files(coco, "val")
    assert files.ids == [stem_of("val", i) for i in sorted(VAL)]
    assert files.gt(files.ids[0]) == coco / "mask" / "val2014" / "42.png"
    (coco / "val2014" / "holiday.jpg").write_bytes((coco / "val2014" / f"{files.ids[0]}.jpg").read_bytes())
    with pytest.raises(DataError, match="'holiday'.*not a COCO val2014 file stem"):
        coco_files(coco, "val")


def test_an_id_list_overrides_the_listing(coco):
    (coco / "lists").mkdir()
    (coco / "lists" / "val2014.txt").write_text(f"{stem_of('val', 139)}\n{stem_of('val', 42)}\n")
    assert coco_files(coco, "val", "lists").ids == [stem_of("val", 139), stem_of("val", 42)]


def test_train_and_val_samples(coco):
    cfg = tiny_coco_config(coco)
    train = TrainSet(cfg.data)
    assert train.ids == [stem_of("train", i) for i in TRAIN]
    item = train[1]  # the grey JPEG comes out with three channels
    assert item["id"] == "COCO_train2014_000000000025"
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert set(item["label"].unique().tolist()) <= {0, *COCO_LABELS}
    val = EvalSet(cfg.data, "val", full_labels=True)
    v = val[0]
    assert v["id"] == "COCO_val2014_000000000042" and v["size"].tolist() == [40, 56]
    gt = np.asarray(Image.open(coco / "mask" / "val2014" / "42.png"))
    assert torch.equal(v["full_label"], torch.from_numpy(gt.astype(np.int64)))


def test_pseudo_labels_do_not_need_train_ground_truth(coco):
    """QUIRK-S2: the reference asserts mask/train2014 exists although training never reads it."""
    for p in (coco / "mask" / "train2014").iterdir():
        p.unlink()
    (coco / "mask" / "train2014").rmdir()
    assert len(TrainSet(tiny_coco_config(coco).data)) == len(TRAIN)


@pytest.mark.parametrize("value, message", [(255, r"\[255\] outside 0..80: "), (81, r"\[81\] outside 0..80")])
def test_coco_ground_truth_has_no_void_value(coco, value, message):
    path = coco / "mask" / "val2014" / "73.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[0, 0] = value
    Image.fromarray(arr, mode="L").save(path)
    ds = EvalSet(tiny_coco_config(coco).data, "val")
    with pytest.raises(DataError, match="ground truth for id 'COCO_val2014_000000000073' has values " + message):
        ds[1]


def test_missing_pseudo_label_names_the_file(coco):
    (coco / "irn_pseudo_label" / f"{stem_of('train', 30)}.png").unlink()
    with pytest.raises(DataError, match="pseudo-label missing for id 'COCO_train2014_000000000030'"):
        TrainSet(tiny_coco_config(coco).data)


def _shrink_mask(coco: Path, image_id: int) -> str:
    stem = stem_of("train", image_id)
    Image.fromarray(np.full((10, 14, 3), 255, np.uint8)).save(coco / "irn_mask" / f"{stem}.png")
    return stem


def test_mask_of_another_size_is_an_error_by_default(coco):
    stem = _shrink_mask(coco, 9)
    with pytest.raises(DataError, match=f"id '{stem}': .*irn_mask/{stem}.png is 14x10 but .*{stem}.jpg is 56x40"):
        TrainSet(tiny_coco_config(coco).data)[0]


def test_mask_size_mismatch_resize_nearest(coco):
    _shrink_mask(coco, 9)
    _, image, _, mask = TrainSet(tiny_coco_config(coco, "data.mask_size_mismatch=resize_nearest").data).load(0)
    assert mask.size == image.size and np.asarray(mask).min() == 1


def test_mask_size_mismatch_crop_like_reference(tmp_path, monkeypatch):
    """QUIRK-S3 oracle: a 32x40 all-ones mask cropped at (i 10, j 20, h 100, w 120) of its image
    and resized to 8x8 keeps only the top-left 2x1 pixels at 1."""
    root = write_tiny_coco(tmp_path / "coco", [9, 10], [42], size=(150, 200))
    stem = stem_of("train", 9)
    Image.fromarray(np.full((32, 40, 3), 255, np.uint8)).save(root / "irn_mask" / f"{stem}.png")
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(root / "irn_pseudo_label" / f"{stem}.png")
    cfg = tiny_coco_config(root, "data.mask_size_mismatch=crop_like_reference", "data.crop_size=8",
                           "data.flip_prob=0.0")
    monkeypatch.setattr(transforms, "random_resized_crop_box", lambda *a, **k: (10, 20, 100, 120))
    mask = TrainSet(cfg.data)[0]["mask"]
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[:2, :1] = 1
    assert torch.equal(mask, expected)


def test_truncated_jpeg_loads_on_coco_and_fails_on_voc(coco):
    path = coco / "val2014" / f"{stem_of('val', 42)}.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
    item = EvalSet(tiny_coco_config(coco).data, "val")[0]
    assert item["image"].shape == (3, 32, 32)
    strict = EvalSet(tiny_coco_config(coco, "data.truncated_images=error").data, "val")
    with pytest.raises(DataError, match="image for id 'COCO_val2014_000000000042' is unreadable or truncated"):
        strict[0]


def test_val_subset_is_fixed_seeded_and_in_split_order():
    ids = [f"id{k:03d}" for k in range(100)]
    a = val_subset_ids(ids, 10, seed=0)
    assert a == val_subset_ids(ids, 10, seed=0) and a != val_subset_ids(ids, 10, seed=1)
    assert len(set(a)) == 10 and a == sorted(a)
    assert val_subset_ids(ids, None, 0) == ids and val_subset_ids(ids, 500, 0) == ids


def test_iterations_per_epoch_match_the_reference_schedule():
    """Oracle 7: COCO 82,783 on 4x4 -> 5,173 per epoch, 413,840 for 80 epochs; VOC 10,582 -> 661."""
    for n, expected in ((82_783, 5_173), (10_582, 661)):
        sampler = DistributedSampler(range(n), num_replicas=4, rank=0, shuffle=True, drop_last=True)
        assert len(DataLoader(range(n), batch_size=4, sampler=sampler, drop_last=True)) == expected
    assert 80 * 5_173 == 413_840


def test_coco_config_keys(coco):
    cfg = tiny_coco_config(coco)
    assert cfg.data.num_classes == 81 and cfg.data.list_dir is None and cfg.train.epochs == 80
    assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 4 and cfg.test.logits_format == "compact"
    with pytest.raises(ConfigError, match="unknown config key 'data.aug'"):
        tiny_coco_config(coco, "data.aug=true")
    with pytest.raises(ConfigError, match="config key 'data.num_classes': coco has 81 classes"):
        tiny_coco_config(coco, "data.num_classes=21")

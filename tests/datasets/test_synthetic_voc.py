"""The synthetic VOC-format set: layout, formats, determinism and pseudo-label statistics."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets.synthetic.voc import CLASS_STYLES, make_synthetic_voc, synthetic_ids
from utils.metrics import confusion_matrix, segmentation_scores
from utils.voc import VOC_CLASSES, voc_palette

SMALL = dict(train=12, val=4, test=2, size=(64, 64), classes=5)
BIG = dict(train=40, val=4, test=2, size=(96, 128), classes=5, seed=0)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _lists(root: Path) -> dict[str, list[str]]:
    d = root / "VOC2012" / "ImageSets" / "Segmentation"
    return {s: (d / f"{s}.txt").read_text().split() for s in ("train_aug", "train", "val", "test")}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "data"
    make_synthetic_voc(root, seed=0, **SMALL)
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("big") / "data"
    return root, make_synthetic_voc(root, **BIG)


def test_same_seed_same_bytes(small, tmp_path):
    again = tmp_path / "again"
    make_synthetic_voc(again, seed=0, **SMALL)
    a, b = _tree(small), _tree(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_differs(small, tmp_path):
    other = tmp_path / "other"
    make_synthetic_voc(other, seed=1, **SMALL)
    a, b = _tree(small), _tree(other)
    assert a.keys() == b.keys()  # same ids, same layout
    images = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_tree_complete(small):
    lists = _lists(small)
    ids = synthetic_ids(SMALL["train"], SMALL["val"], SMALL["test"])
    assert lists["train_aug"] == ids["train"] and lists["val"] == ids["val"] and lists["test"] == ids["test"]
    assert lists["train"] == ids["train"][: len(ids["train"]) // 2]
    every = lists["train_aug"] + lists["val"] + lists["test"]
    assert len(set(every)) == len(every)
    assert all(isinstance(i, str) and len(i) == 11 and i[4] == "_" for i in every)
    voc = small / "VOC2012"
    for i in every:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file()
        assert (voc / "Annotations" / f"{i}.xml").is_file()
    for i in lists["train_aug"] + lists["val"]:
        assert (voc / "SegmentationClass" / f"{i}.png").is_file()
        assert (voc / "SegmentationClassAug" / f"{i}.png").is_file()
    for i in lists["train_aug"]:
        assert (small / "irn_pseudo_label" / f"{i}.png").is_file()
        assert (small / "irn_mask" / f"{i}.png").is_file()
    for i in lists["test"]:
        assert not (voc / "SegmentationClass" / f"{i}.png").exists()
    summary = json.loads((small / "synthetic_voc.json").read_text())
    assert summary["complete"] and summary["counts"]["train_aug"] == SMALL["train"]


def test_file_formats(big):
    root, _ = big
    lists = _lists(root)
    k = BIG["classes"]
    allowed = set(range(k + 1)) | {255}
    void_seen = False
    for i in lists["train_aug"] + lists["val"]:
        img = Image.open(root / "VOC2012" / "JPEGImages" / f"{i}.jpg")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (128, 96)
        gt_img = Image.open(root / "VOC2012" / "SegmentationClass" / f"{i}.png")
        assert gt_img.mode == "P"
        assert np.array_equal(np.asarray(gt_img.getpalette(), np.uint8).reshape(-1, 3)[:256], voc_palette())
        gt = np.asarray(gt_img)
        assert set(np.unique(gt).tolist()) <= allowed
        assert (gt > 0).any() and (gt != 255).any()
        void_seen |= bool((gt == 255).any())
        aug = root / "VOC2012" / "SegmentationClassAug" / f"{i}.png"
        assert np.array_equal(_read(aug), gt)
    assert void_seen
    for i in lists["train_aug"]:
        pl = Image.open(root / "irn_pseudo_label" / f"{i}.png")
        assert pl.mode == "L" and pl.size == (128, 96)
        assert set(np.unique(np.asarray(pl)).tolist()) <= set(range(k + 1))
        mask = Image.open(root / "irn_mask" / f"{i}.png")
        assert mask.mode == "RGB" and mask.size == (128, 96)
        m = np.asarray(mask)
        assert (m[..., 0] == m[..., 1]).all() and (m[..., 0] == m[..., 2]).all()
        assert set(np.unique(m).tolist()) <= {0, 255}


def test_xml_matches_ground_truth(big):
    root, _ = big
    lists = _lists(root)
    names = set(VOC_CLASSES[1:BIG["classes"] + 1])
    for i in lists["train_aug"] + lists["val"] + lists["test"]:
        tree = ET.parse(root / "VOC2012" / "Annotations" / f"{i}.xml").getroot()
        assert tree.tag == "annotation" and tree.findtext("filename") == f"{i}.jpg"
        assert (int(tree.findtext("size/width")), int(tree.findtext("size/height"))) == (128, 96)
        assert tree.findtext("size/depth") == "3"
        objects = tree.findall("object")
        assert 1 <= len(objects) <= 4
        in_xml = set()
        for obj in objects:
            assert obj.findtext("difficult") == "0"
            box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= box[0] <= box[2] <= 128 and 1 <= box[1] <= box[3] <= 96
            in_xml.add(obj.findtext("name"))
        assert in_xml <= names
        if i in lists["test"]:
            continue
        gt = _read(root / "VOC2012" / "SegmentationClass" / f"{i}.png")
        in_gt = {VOC_CLASSES[c] for c in np.unique(gt) if 0 < c < 255}
        assert in_xml == in_gt, i


def test_class_styles_distinct():
    shapes = {s for s, _ in CLASS_STYLES}
    textures = {t for _, t in CLASS_STYLES}
    assert len(set(CLASS_STYLES)) == 20 and len(shapes) > 4 and len(textures) > 4


def test_pseudo_label_miou_in_range_and_reproducible(big):
    root, summary = big
    lists = _lists(root)
    n = BIG["classes"] + 1
    conf = torch.zeros((n, n), dtype=torch.int64)
    for i in lists["train_aug"]:
        gt = torch.from_numpy(_read(root / "VOC2012" / "SegmentationClass" / f"{i}.png").copy())
        pl = torch.from_numpy(_read(root / "irn_pseudo_label" / f"{i}.png").copy())
        conf += confusion_matrix(pl, gt, n)
    scores = segmentation_scores(conf)
    assert 0.60 <= scores["miou"] <= 0.75
    assert scores["miou"] == pytest.approx(summary["pseudo_label"]["miou"], abs=1e-12)
    stored = json.loads((root / "synthetic_voc.json").read_text())
    assert stored == summary
    assert stored["settings"]["seed"] == BIG["seed"] and stored["settings"]["size"] == [96, 128]


def test_mask_keeps_half_with_high_precision(big):
    root, summary = big
    lists = _lists(root)
    n = BIG["classes"] + 1
    kept = np.zeros(n, np.int64)
    total = np.zeros(n, np.int64)
    kept_ok = kept_valid = ok = valid_all = 0
    for i in lists["train_aug"]:
        gt = _read(root / "VOC2012" / "SegmentationClass" / f"{i}.png")
        pl = _read(root / "irn_pseudo_label" / f"{i}.png")
        m = _read(root / "irn_mask" / f"{i}.png")[..., 0] > 0
        for c in np.unique(pl):
            region = pl == c
            # gen_mask: exactly floor(n_c / 2) pixels of every predicted class region
            assert int((m & region).sum()) == int(region.sum()) // 2
        kept += np.bincount(pl[m], minlength=n)
        total += np.bincount(pl.ravel(), minlength=n)
        valid = gt != 255
        kept_valid += int((m & valid).sum())
        kept_ok += int((m & valid & (pl == gt)).sum())
        valid_all += int(valid.sum())
        ok += int((valid & (pl == gt)).sum())
    assert 0.4 <= kept.sum() / total.sum() <= 0.6
    present = total > 0
    assert np.all(np.abs(kept[present] / total[present] - 0.5) < 0.05)
    precision, accuracy = kept_ok / kept_valid, ok / valid_all
    assert precision > accuracy + 0.02
    assert precision == pytest.approx(summary["mask"]["kept_precision"], abs=1e-12)


def test_errors_concentrate_at_boundaries(big):
    root, _ = big
    near_wrong = near_total = far_wrong = far_total = 0
    for i in _lists(root)["train_aug"]:
        gt = _read(root / "VOC2012" / "SegmentationClass" / f"{i}.png")
        pl = _read(root / "irn_pseudo_label" / f"{i}.png")
        k = np.ones((3, 3), np.uint8)
        boundary = (gt == 255) | (cv2.dilate(gt, k) != cv2.erode(gt, k))
        near = cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, 5) <= 3
        valid = gt != 255
        wrong = valid & (pl != gt)
        near_wrong += int((wrong & near).sum())
        near_total += int((valid & near).sum())
        far_wrong += int((wrong & ~near).sum())
        far_total += int((valid & ~near).sum())
    near_rate, far_rate = near_wrong / near_total, far_wrong / far_total
    assert far_rate > 0  # some whole-part errors exist, not only boundary jitter
    assert near_rate > 4 * far_rate


def test_pseudo_label_not_speckled(big):
    root, _ = big
    # CAM-like errors come in connected regions: few wrong pixels are isolated.
    isolated = wrong_total = 0
    for i in _lists(root)["train_aug"][:20]:
        gt = _read(root / "VOC2012" / "SegmentationClass" / f"{i}.png")
        pl = _read(root / "irn_pseudo_label" / f"{i}.png")
        wrong = ((pl != gt) & (gt != 255)).astype(np.uint8)
        neighbours = cv2.filter2D(wrong, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT) - wrong
        isolated += int(((wrong == 1) & (neighbours == 0)).sum())
        wrong_total += int(wrong.sum())
    assert isolated < 0.02 * max(wrong_total, 1)


def test_rerun_is_noop_and_other_settings_raise(tmp_path):
    root = tmp_path / "data"
    first = make_synthetic_voc(root, seed=0, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = make_synthetic_voc(root, seed=0, **SMALL)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes
    with pytest.raises(FileExistsError, match="seed"):
        make_synthetic_voc(root, seed=1, **SMALL)
    # overwrite with fewer images: the old extra ids disappear
    smaller = dict(SMALL, train=6)
    make_synthetic_voc(root, seed=1, overwrite=True, **smaller)
    ids = synthetic_ids(6, SMALL["val"], SMALL["test"])
    assert sorted(p.stem for p in (root / "irn_pseudo_label").iterdir()) == ids["train"]
    assert len(list((root / "VOC2012" / "JPEGImages").iterdir())) == 6 + SMALL["val"] + SMALL["test"]


def test_refuses_foreign_voc_dir(tmp_path):
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(FileExistsError):
        make_synthetic_voc(tmp_path, seed=0, **SMALL)


def _class_hues(root: Path, classes: int) -> dict[int, list[float]]:
    """Per image and class: the circular mean hue (degrees) of the class's pixels."""
    hues: dict[int, list[float]] = {c: [] for c in range(1, classes + 1)}
    for i in (root / "VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split():
        img = np.asarray(Image.open(root / "VOC2012/JPEGImages" / f"{i}.jpg").convert("RGB"))
        gt = np.asarray(Image.open(root / "VOC2012/SegmentationClass" / f"{i}.png"))
        hue = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)[..., 0].astype(np.float64) * 2 * np.pi / 256
        for c in np.unique(gt):
            if 0 < c <= classes:
                sel = hue[gt == c]
                hues[int(c)].append(float(np.angle(np.exp(1j * sel).mean(), deg=True)))
    return hues


def test_class_colour_mode(tmp_path):
    """colours="class": every instance of a class has that class's hue, so the per-image mean
    hue of a class varies little across images; the default mode draws colours at random and
    keeps the stored settings (and bytes) of sets made before the option existed."""
    kw = dict(train=12, val=1, test=1, size=(48, 64), classes=3, seed=4, object_scale=(0.25, 0.4), max_objects=2)
    fixed = make_synthetic_voc(tmp_path / "class", colours="class", colour_jitter=10.0, **kw)
    free = make_synthetic_voc(tmp_path / "instance", **kw)
    assert fixed["settings"]["colours"] == "class" and "colours" not in free["settings"]
    assert fixed["settings"]["object_scale"] == [0.25, 0.4] and fixed["settings"]["max_objects"] == 2

    def spread(hues: list[float]) -> float:  # circular std of the per-image mean hues, degrees
        r = abs(np.exp(1j * np.radians(hues)).mean())
        return float(np.degrees(np.sqrt(-2 * np.log(max(r, 1e-9)))))
    fixed_h, free_h = _class_hues(tmp_path / "class", 3), _class_hues(tmp_path / "instance", 3)
    counted = [c for c in fixed_h if len(fixed_h[c]) >= 3 and len(free_h[c]) >= 3]
    assert counted
    for c in counted:
        assert spread(fixed_h[c]) < 20 < spread(free_h[c]), (c, fixed_h[c], free_h[c])
    with pytest.raises(ValueError, match="colours must be one of"):
        make_synthetic_voc(tmp_path / "bad", colours="rainbow", **kw)

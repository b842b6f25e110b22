"""tools/prepare_coco.py and datasets/prepare/coco.py: the reference's GT rule (first-stage
spec §16.1) on hand-made annotations, file naming, input errors, resume and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import datasets.prepare.coco as cp
from datasets.coco import CATEGORIES, CATEGORY_TO_LABEL, gt_name, image_id_of, stem_of
from datasets.prepare.coco import (CocoPrepareError, annotations_to_mask, category_map, check_categories,
                                   image_labels, prepare_coco)
from datasets.synthetic.coco import coco_categories, uncompressed_rle
from datasets.prepare.cls_labels import load_cls_labels
from tools import prepare_coco as cli

REPO = Path(__file__).resolve().parents[2]
# pycocotools (<= 2.0.8) under numpy 2 warns on every decode; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn:DeprecationWarning")
CAT_MAP = category_map(coco_categories())
H, W = 12, 14


def box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """Polygon of the pixels x0..x1-1, y0..y1-1 (pycocotools' corner convention)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(aid: int, image_id: int, cat: int, segm, crowd: int = 0) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": cat, "segmentation": segm,
            "area": 0.0, "bbox": [0.0, 0.0, 0.0, 0.0], "iscrowd": crowd}


def block(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# ----------------------------------------------------------------------------- the rule


def test_category_map_is_ascending_and_sparse():
    assert len(CAT_MAP) == 80
    assert (CAT_MAP[1], CAT_MAP[11], CAT_MAP[13], CAT_MAP[27], CAT_MAP[28], CAT_MAP[31], CAT_MAP[90]) == \
        (1, 11, 12, 25, 26, 27, 80)
    assert CAT_MAP == CATEGORY_TO_LABEL
    # Ascending id order, whatever the order the JSON lists them in.
    assert category_map([{"id": 7}, {"id": 3}, {"id": 40}]) == {3: 1, 7: 2, 40: 3}
    with pytest.raises(ValueError, match="duplicate"):
        category_map([{"id": 3}, {"id": 3}])


def test_later_annotations_overwrite_earlier_ones():
    a = ann(1, 1, 13, box(2, 2, 10, 8))      # label 12
    b = ann(2, 1, 90, box(6, 4, 12, 11))     # label 80, overlaps a on x 6..9, y 4..7
    want = np.zeros((H, W), np.uint8)
    want[2:8, 2:10] = 12
    want[4:11, 6:12] = 80
    np.testing.assert_array_equal(annotations_to_mask([a, b], H, W, CAT_MAP), want)
    swapped = np.zeros((H, W), np.uint8)
    swapped[4:11, 6:12] = 80
    swapped[2:8, 2:10] = 12
    np.testing.assert_array_equal(annotations_to_mask([b, a], H, W, CAT_MAP), swapped)
    assert annotations_to_mask([a, b], H, W, CAT_MAP)[5, 7] == 80
    assert annotations_to_mask([b, a], H, W, CAT_MAP)[5, 7] == 12


def test_rule_with_a_custom_rasteriser_is_pure():
    masks = {1: block(0, 6, 0, 6), 2: block(3, 9, 3, 9), 3: block(0, 12, 0, 2)}
    anns = [ann(1, 1, 27, None), ann(2, 1, 5, None), ann(3, 1, 44, None, crowd=1)]
    out = annotations_to_mask(anns, H, W, CAT_MAP, lambda a: masks[a["id"]])
    want = np.zeros((H, W), np.uint8)
    want[0:6, 0:6] = 25
    want[3:9, 3:9] = 5
    np.testing.assert_array_equal(out, want)  # the crowd strip (x 0..1) is not painted
    assert out.dtype == np.uint8


def test_crowd_is_background_in_the_mask_but_present_in_the_labels():
    crowd = ann(1, 1, 27, uncompressed_rle(block(0, 12, 0, 7)), crowd=1)
    person = ann(2, 1, 1, box(9, 1, 13, 5))
    mask = annotations_to_mask([crowd, person], H, W, CAT_MAP)
    want = np.zeros((H, W), np.uint8)
    want[1:5, 9:13] = 1
    np.testing.assert_array_equal(mask, want)
    assert image_labels([crowd, person], CAT_MAP) == [0, 24]
    # A crowd painted after an instance does not erase it either.
    np.testing.assert_array_equal(annotations_to_mask([person, crowd], H, W, CAT_MAP), want)


def test_polygon_compressed_and_uncompressed_rle():
    shape = np.zeros((H, W), np.uint8)
    shape[3:9, 2:6] = 1
    shape[5, 6:11] = 1  # not a rectangle
    rle = mask_utils.encode(np.asfortranarray(shape))
    compressed = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    for segm in (compressed, uncompressed_rle(shape)):
        # teddy bear: category 88 -> label 78
        np.testing.assert_array_equal(annotations_to_mask([ann(1, 1, 88, segm)], H, W, CAT_MAP), shape * 78)
    two_parts = box(0, 0, 3, 2) + box(10, 9, 14, 12)
    out = annotations_to_mask([ann(1, 1, 60, two_parts)], H, W, CAT_MAP)
    assert set(np.unique(out)) == {0, 55}
    assert out[0:2, 0:3].all() and out[9:12, 10:14].all() and int((out > 0).sum()) == 6 + 12
    assert uncompressed_rle(block(0, 1, 0, 1))["counts"][:2] == [0, 1]  # COCO's runs start with zeros


def test_no_annotations_gives_zeros_and_no_labels():
    out = annotations_to_mask([], H, W, CAT_MAP)
    assert out.shape == (H, W) and out.dtype == np.uint8 and not out.any()
    assert image_labels([], CAT_MAP) == []
    assert cp.ann_to_mask(ann(1, 1, 1, []), H, W).sum() == 0


def test_size_mismatch_and_unknown_category_fail():
    with pytest.raises(ValueError, match="annotation 7"):
        annotations_to_mask([ann(7, 1, 1, uncompressed_rle(np.ones((5, 5), np.uint8)))], H, W, CAT_MAP)
    with pytest.raises(KeyError):
        annotations_to_mask([ann(1, 1, 12, box(0, 0, 2, 2))], H, W, CAT_MAP)  # 12 is not a COCO id


# ----------------------------------------------------------------------------- a hand-made tree


SIZES = {"train": {30: (12, 14), 9: (10, 16), 25: (8, 8)}, "val": {42: (9, 11), 4: (6, 7)}}


def _anns(split: str) -> list[dict]:
    if split == "train":
        return [ann(5, 30, 13, box(1, 1, 8, 8)), ann(3, 9, 90, box(0, 0, 16, 10)),
                ann(4, 30, 27, box(4, 4, 12, 11)), ann(6, 30, 62, uncompressed_rle(block(0, 12, 0, 3)), crowd=1),
                ann(1, 9, 1, box(2, 2, 5, 5))]
    return [ann(10, 4, 88, uncompressed_rle(block(0, 6, 0, 7, 6, 7)), crowd=1)]


def write_tree(root: Path, categories: list[dict] | None = None) -> Path:
    rng = np.random.default_rng(0)
    for split, sizes in SIZES.items():
        folder = root / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for image_id, (h, w) in sizes.items():  # deliberately not in id order
            name = stem_of(split, image_id) + ".jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        data = {"images": images, "annotations": _anns(split), "categories": categories or coco_categories()}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "coco")


def test_prepare_writes_masks_lists_and_labels(tree):
    summary = prepare_coco(tree, workers=1, progress=False)
    t = summary["splits"]["train"]
    assert (t["images"], t["annotations"], t["crowd_annotations"], t["images_without_annotations"],
            t["masks_written"], t["masks_kept"]) == (3, 5, 1, 1, 3, 0)
    v = summary["splits"]["val"]
    assert (v["images"], v["annotations"], v["crowd_annotations"], v["images_without_annotations"],
            v["images_without_mask_pixels"]) == (2, 1, 1, 1, 2)
    stored = json.loads((tree / "prepare_coco.json").read_text())
    assert stored["splits"]["train"]["masks_written"] == 3 and stored["splits"]["val"]["complete"] is True

    img = Image.open(tree / "mask/train2014/30.png")
    assert img.mode == "L" and img.size == (14, 12)
    m30 = np.asarray(img)
    want = np.zeros((12, 14), np.uint8)
    want[1:8, 1:8] = 12       # category 13, first in the JSON
    want[4:11, 4:12] = 25     # category 27, later: over it; the crowd (62) is background
    np.testing.assert_array_equal(m30, want)
    m9 = np.asarray(Image.open(tree / "mask/train2014/9.png"))
    assert m9.shape == (10, 16) and set(np.unique(m9)) == {1, 80}  # person after the full-image toothbrush
    assert int((m9 == 1).sum()) == 9
    assert not np.asarray(Image.open(tree / "mask/train2014/25.png")).any()
    assert not np.asarray(Image.open(tree / "mask/val2014/4.png")).any()  # crowd only

    stems = (tree / "lists/train2014.txt").read_text().split()
    assert stems == ["COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000030"]
    assert (tree / "lists/val2014.txt").read_text() == "COCO_val2014_000000000004\nCOCO_val2014_000000000042\n"
    for s in stems:  # stem -> int id -> GT name, and back
        assert (tree / "mask/train2014" / gt_name(s)).is_file()
        assert stem_of("train", image_id_of(s)) == s
    assert gt_name("COCO_val2014_000000000042") == "42.png"

    labels = load_cls_labels(tree / "cls_labels_train2014.json")
    assert labels == {"COCO_train2014_000000000009": [0, 79], "COCO_train2014_000000000025": [],
                      "COCO_train2014_000000000030": [11, 24, 56]}  # crowd chair (62 -> 57) included
    assert load_cls_labels(tree / "cls_labels_val2014.json") == {
        "COCO_val2014_000000000004": [77], "COCO_val2014_000000000042": []}
    classes = json.loads((tree / "cls_labels_train2014.json").read_text())["classes"]
    assert classes == [name for _, name in CATEGORIES] and len(classes) == 80


def test_pool_gives_the_same_masks(tree, tmp_path, monkeypatch):
    prepare_coco(tree, workers=1, progress=False)
    other = write_tree(tmp_path / "coco2")
    monkeypatch.setattr(cp, "CHUNK", 1)  # one image per task: 3 tasks over 2 processes
    s = prepare_coco(other, workers=2, progress=False)
    assert s["splits"]["train"]["masks_written"] == 3
    for p in sorted((tree / "mask").rglob("*.png")):
        assert p.read_bytes() == (other / "mask" / p.relative_to(tree / "mask")).read_bytes()


def test_missing_annotation_file(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    with pytest.raises(CocoPrepareError, match="annotation file not found: .*instances_train2014.json"):
        prepare_coco(root, progress=False)


def test_missing_image_names_id_and_path(tree):
    (tree / "train2014" / "COCO_train2014_000000000025.jpg").unlink()
    with pytest.raises(CocoPrepareError) as e:
        prepare_coco(tree, splits=("train",), progress=False)
    msg = str(e.value)
    assert "image id 25" in msg and str(tree / "train2014" / "COCO_train2014_000000000025.jpg") in msg
    assert not (tree / "mask" / "train2014" / "30.png").exists()  # checked before anything is written


def test_misnamed_image_in_json(tree):
    path = tree / "annotations/instances_val2014.json"
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "COCO_val2014_42.jpg"
    path.write_text(json.dumps(data))
    with pytest.raises(CocoPrepareError,
                       match=r"instances_val2014.json: image id 42 has file_name 'COCO_val2014_42.jpg'"):
        prepare_coco(tree, splits=("val",), progress=False)


def test_other_categories_are_refused(tmp_path):
    cats = coco_categories()
    cats[11] = {"id": 12, "name": "street sign", "supercategory": "outdoor"}  # 2014 uses 13 here
    root = write_tree(tmp_path / "coco", categories=cats)
    with pytest.raises(CocoPrepareError, match=r"instances_train2014.json: categories are not COCO's 80"):
        prepare_coco(root, progress=False)
    with pytest.raises(CocoPrepareError, match="x.json"):
        check_categories(coco_categories()[:79], "x.json")
    check_categories(coco_categories()[::-1], "x.json")  # order does not matter


def test_annotation_of_unknown_image(tree):
    path = tree / "annotations/instances_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"].append(ann(99, 77, 1, box(0, 0, 2, 2)))
    path.write_text(json.dumps(data))
    with pytest.raises(CocoPrepareError, match="annotation 99 refers to unknown image id 77"):
        prepare_coco(tree, splits=("val",), progress=False)


def _edit_train_json(tree: Path, edit) -> Path:
    path = tree / "annotations/instances_train2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("segm, count", [([[1, 1, 5, 5]], 4), ([[2, 2]], 2), ([[1, 1, 8, 1, 8, 8], []], 0),
                                         ([[1, 1, 8, 1, 8, 8, 3]], 7)])
def test_a_polygon_of_fewer_than_three_points_is_refused_before_writing(tree, segm, count):
    """pycocotools reads a 4-number polygon as a box and fails on fewer; the spec names no rule
    for them, so they are refused (a crowd one is never rasterised and passes)."""
    def edit(data):
        data["annotations"][2]["segmentation"] = segm  # annotation 4, image 30
        data["annotations"].append(ann(8, 25, 1, [[1, 1, 2, 2]], crowd=1))
    path = _edit_train_json(tree, edit)
    with pytest.raises(CocoPrepareError) as e:
        prepare_coco(tree, splits=("train",), workers=1, progress=False)
    assert str(e.value) == (f"{path}: annotation 4 (image id 30) has a polygon of {count} numbers; "
                            f"a polygon is x, y pairs of at least 3 points")
    assert not (tree / "mask/train2014").exists() or not list((tree / "mask/train2014").iterdir())


def test_an_image_size_other_than_the_json_says_is_refused_before_writing(tree):
    def edit(data):
        data["images"][1]["height"] = 11  # image 9 is 16 x 10
    path = _edit_train_json(tree, edit)
    with pytest.raises(CocoPrepareError) as e:
        prepare_coco(tree, splits=("train",), workers=1, progress=False)
    image = tree / "train2014" / "COCO_train2014_000000000009.jpg"
    assert str(e.value) == (f"{path}: image id 9 is 16x11 (width x height) there, but its image file is "
                            f"16x10: {image}")
    assert not (tree / "mask/train2014").exists() or not list((tree / "mask/train2014").iterdir())
    _edit_train_json(tree, lambda data: data["images"][1].update(height=10))
    (tree / "train2014" / "COCO_train2014_000000000025.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CocoPrepareError, match=r"image file for image id 25 is unreadable: .*000000000025.jpg"):
        prepare_coco(tree, splits=("train",), workers=1, progress=False)


def test_rerun_keeps_masks_overwrite_rewrites(tree):
    prepare_coco(tree, workers=1, progress=False)
    masks = sorted((tree / "mask").rglob("*.png"))
    assert len(masks) == 5
    past = 1_000_000_000
    for p in masks:
        os.utime(p, ns=(past, past))
    s = prepare_coco(tree, workers=1, progress=False)
    assert s["splits"]["train"]["up_to_date"] and s["splits"]["train"]["masks_kept"] == 3
    assert all(p.stat().st_mtime_ns == past for p in masks)

    (tree / "mask/train2014/9.png").unlink()  # as after a kill
    s = prepare_coco(tree, workers=1, progress=False)
    assert (s["splits"]["train"]["masks_written"], s["splits"]["train"]["masks_kept"]) == (1, 2)
    assert (tree / "mask/train2014/9.png").is_file()
    assert (tree / "mask/train2014/30.png").stat().st_mtime_ns == past

    s = prepare_coco(tree, workers=1, overwrite=True, progress=False)
    assert (s["splits"]["train"]["masks_written"], s["splits"]["train"]["masks_kept"]) == (3, 0)
    assert all(p.stat().st_mtime_ns != past for p in masks)


def test_changed_annotation_file_rewrites_stale_masks(tree):
    prepare_coco(tree, workers=1, progress=False)
    path = tree / "annotations/instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 4]  # drop the backpack
    path.write_text(json.dumps(data))
    s = prepare_coco(tree, splits=("train",), workers=1, progress=False)
    assert s["splits"]["train"]["stale_masks_rewritten"] and s["splits"]["train"]["masks_written"] == 3
    assert set(np.unique(np.asarray(Image.open(tree / "mask/train2014/30.png")))) == {0, 12}


def test_cli_counts_and_exit_codes(tree, capsys):
    assert cli.main(["--coco", str(tree), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert ("train2014: 3 images, 5 annotations (1 crowd), 1 images without annotations; "
            "masks 3 written / 0 kept") in out
    assert "val2014: 2 images, 1 annotations (1 crowd), 1 images without annotations; masks 2 written / 0 kept" in out
    assert cli.main(["--coco", str(tree), "--quiet", "--splits", "val"]) == 0
    assert "val2014: 2 images, 1 annotations (1 crowd), 1 images without annotations; masks 0 written / 2 kept" \
        in capsys.readouterr().out
    assert cli.main(["--coco", str(tree), "--quiet", "--splits", "val", "--overwrite"]) == 0
    assert "masks 2 written / 0 kept" in capsys.readouterr().out
    assert cli.main(["--coco", str(tree), "--quiet", "--splits", "test"]) == 2
    assert "unknown COCO split 'test'" in capsys.readouterr().err


def test_cli_subprocess_missing_annotations(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools/prepare_coco.py"), "--coco", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1  # a data error; usage errors exit 2
    assert f"annotation file not found: {tmp_path / 'annotations' / 'instances_train2014.json'}" in r.stderr


def test_killed_rewrite_after_a_change_resumes_without_stale_masks(tree, monkeypatch):
    prepare_coco(tree, splits=("train",), workers=1, progress=False)
    path = tree / "annotations/instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 4]
    path.write_text(json.dumps(data))
    calls = []

    def dying(tasks):  # the first image gets written, then the run is "killed"
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(tasks)
    real = cp._write_chunk
    monkeypatch.setattr(cp, "CHUNK", 1)
    monkeypatch.setattr(cp, "_write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_coco(tree, splits=("train",), workers=1, progress=False)
    assert len(list((tree / "mask/train2014").glob("*.png"))) == 1  # 9.png; the old 25, 30 are gone
    monkeypatch.setattr(cp, "_write_chunk", real)
    s = prepare_coco(tree, splits=("train",), workers=1, progress=False)
    assert (s["splits"]["train"]["masks_written"], s["splits"]["train"]["masks_kept"]) == (2, 1)
    assert set(np.unique(np.asarray(Image.open(tree / "mask/train2014/30.png")))) == {0, 12}

"""The synthetic COCO-2014-format tree: COCO's features, determinism, prepare_coco on it,
simulated first-stage outputs, reuse / refusal, the CLI."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasets.coco import CATEGORIES, CATEGORY_TO_LABEL, image_id_of, stem_of
from datasets.synthetic.coco import (make_synthetic_coco, make_synthetic_coco_from_config,
                                     synthetic_category_ids, synthetic_image_ids)
from datasets.prepare.cls_labels import load_cls_labels
from tools import make_synthetic_coco as cli

# pycocotools (<= 2.0.8) under numpy 2 warns on every decode; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn:DeprecationWarning")
SYN = SimpleNamespace(train=8, val=4, test=5, size=(64, 64), classes=5, seed=0, colours="instance",
                      colour_jitter=25.0, object_scale=(0.14, 0.3), max_objects=4, size_jitter=0.2)
ARGS = dict(train=8, val=4, size=(64, 64), classes=5, seed=0, size_jitter=0.2)
SPLITS = ("train", "val")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(root: Path, split: str) -> COCO:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"instances_{split}2014.json"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn") / "coco"
    return root, make_synthetic_coco_from_config(root, SYN, progress=False)


def test_category_and_image_ids():
    assert synthetic_category_ids(5) == [9, 27, 46, 62, 82]
    assert [CATEGORY_TO_LABEL[c] for c in synthetic_category_ids(5)] == [9, 25, 41, 57, 73]
    for k in (1, 2, 7, 20):
        ids = synthetic_category_ids(k)
        assert len(set(ids)) == k and all(c in CATEGORY_TO_LABEL for c in ids) and ids == sorted(ids)
    ids = synthetic_image_ids(6, 4)
    allids = ids["train"] + ids["val"]
    gaps = np.diff(allids)
    assert (gaps > 1).all() and len(set(gaps.tolist())) > 1  # increasing, with irregular gaps
    assert not set(ids["train"]) & set(ids["val"])


def test_layout_and_names(built):
    root, summary = built
    assert summary["category_ids"] == [9, 27, 46, 62, 82] and summary["label_ids"] == [9, 25, 41, 57, 73]
    assert summary["class_names"] == ["boat", "backpack", "wine glass", "chair", "refrigerator"]
    for split in SPLITS:
        coco = _coco(root, split)
        ids = sorted(coco.imgs)
        assert ids == synthetic_image_ids(8, 4)[split]
        for image_id in ids:
            info = coco.imgs[image_id]
            stem = stem_of(split, image_id)
            assert info["file_name"] == f"{stem}.jpg" and image_id_of(stem) == image_id
            img = Image.open(root / f"{split}2014" / info["file_name"])
            assert img.size == (info["width"], info["height"])
            assert (root / "mask" / f"{split}2014" / f"{image_id}.png").is_file()
        assert (root / "lists" / f"{split}2014.txt").read_text().split() == [stem_of(split, i) for i in ids]
        assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == list(CATEGORIES)
        assert {c["supercategory"] for c in coco.dataset["categories"]} >= {"person", "vehicle", "indoor"}
    sizes = {Image.open(p).size for p in (root / "train2014").glob("*.jpg")}
    assert len(sizes) > 1  # size_jitter: images differ in size, as COCO's do
    assert not (root / "test2014").exists()
    assert not (root / "irn_pseudo_label" / "COCO_val2014_000000000049.png").exists()


def test_coco_features_in_every_split(built):
    root, summary = built
    for split in SPLITS:
        coco = _coco(root, split)
        anns = coco.dataset["annotations"]
        kinds = {"polygon": 0, "rle": 0, "crowd": 0}
        for a in anns:
            s = a["segmentation"]
            if a["iscrowd"]:
                assert isinstance(s["counts"], list)
                kinds["crowd"] += 1
            elif isinstance(s, list):
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in s)
                kinds["polygon"] += 1
            else:
                assert isinstance(s["counts"], str)
                kinds["rle"] += 1
            m = coco.annToMask(a)
            assert a["area"] == float(m.sum()) > 0
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert min(kinds.values()) >= 1, (split, kinds)
        assert kinds == {k: summary["splits"][split][k] for k in kinds}
        assert len({a["id"] for a in anns}) == len(anns)
        # overlapping instances of one image
        overlaps = sum(1 for i in coco.imgs for p, a in enumerate(coco.imgToAnns[i]) for b in coco.imgToAnns[i][p + 1:]
                       if (coco.annToMask(a) & coco.annToMask(b)).any())
        assert overlaps == summary["splits"][split]["overlapping_pairs"] >= 1
        grey = [i for i in coco.imgs if Image.open(root / f"{split}2014" / coco.imgs[i]["file_name"]).mode == "L"]
        assert [stem_of(split, i) for i in grey] == summary["splits"][split]["grey_images"] and grey
        empty = [i for i in coco.imgs if not coco.imgToAnns.get(i)]
        assert [stem_of(split, i) for i in empty] == summary["splits"][split]["empty_images"] and empty
        used = {a["category_id"] for a in anns}
        assert used <= set(summary["category_ids"]) and len(used) >= 2
    # Ids above the gaps of the table (12, 26, 45, ...) are used: labels differ from category ids.
    assert any(CATEGORY_TO_LABEL[c] != c for c in summary["category_ids"])


def test_prepared_masks_follow_the_list_order_rule(built):
    """Recompute each GT with pycocotools' own annToMask in list order; ids run the other way,
    so an implementation painting in id order would differ where instances overlap."""
    root, summary = built
    allowed = {0} | set(summary["label_ids"])
    differs_in_id_order = 0
    for split in SPLITS:
        coco = _coco(root, split)
        for image_id, info in coco.imgs.items():
            gt = np.asarray(Image.open(root / "mask" / f"{split}2014" / f"{image_id}.png"))
            assert gt.dtype == np.uint8 and gt.shape == (info["height"], info["width"])
            assert set(np.unique(gt).tolist()) <= allowed
            anns = coco.imgToAnns.get(image_id, [])
            want = np.zeros_like(gt)
            by_id = np.zeros_like(gt)
            for a in anns:
                if not a["iscrowd"]:
                    want[coco.annToMask(a) > 0] = CATEGORY_TO_LABEL[a["category_id"]]
            for a in sorted(anns, key=lambda a: a["id"]):
                if not a["iscrowd"]:
                    by_id[coco.annToMask(a) > 0] = CATEGORY_TO_LABEL[a["category_id"]]
            np.testing.assert_array_equal(gt, want)
            differs_in_id_order += int((by_id != want).any())
        labels = load_cls_labels(root / f"cls_labels_{split}2014.json")
        for image_id in coco.imgs:
            want_labels = sorted({CATEGORY_TO_LABEL[a["category_id"]] - 1 for a in coco.imgToAnns.get(image_id, [])})
            assert labels[stem_of(split, image_id)] == want_labels
        crowd_stem = summary["splits"][split]["crowd_images"][0]
        crowd_ann = [a for a in coco.imgToAnns[image_id_of(crowd_stem)] if a["iscrowd"]][0]
        assert CATEGORY_TO_LABEL[crowd_ann["category_id"]] - 1 in labels[crowd_stem]
    assert differs_in_id_order >= 1
    p = summary["prepare"]["splits"]
    assert (p["train"]["images"], p["val"]["images"]) == (8, 4)
    assert p["train"]["crowd_annotations"] == 1 and p["train"]["images_without_annotations"] == 1


def test_pseudo_labels_and_masks(built):
    root, summary = built
    coco = _coco(root, "train")
    allowed = {0} | set(summary["label_ids"])
    agree = total = 0
    for image_id, info in coco.imgs.items():
        stem = stem_of("train", image_id)
        pl_img = Image.open(root / "irn_pseudo_label" / f"{stem}.png")
        mk_img = Image.open(root / "irn_mask" / f"{stem}.png")
        assert pl_img.mode == "L" and mk_img.mode == "RGB"
        assert pl_img.size == mk_img.size == (info["width"], info["height"])
        pl, mk = np.asarray(pl_img), np.asarray(mk_img)
        assert set(np.unique(pl).tolist()) <= allowed
        assert set(np.unique(mk).tolist()) <= {0, 255} and (mk[..., 0] == mk[..., 2]).all()
        labelled = set(np.unique(pl).tolist()) - {0}
        image_classes = {CATEGORY_TO_LABEL[a["category_id"]] for a in coco.imgToAnns.get(image_id, [])}
        assert labelled <= image_classes  # only the image's classes, as the random walk gives
        if stem in summary["splits"]["train"]["empty_images"]:
            assert not pl.any() and int((mk[..., 0] == 255).sum()) == pl.size // 2
        else:
            gt = np.asarray(Image.open(root / "mask" / "train2014" / f"{image_id}.png"))
            if stem not in summary["splits"]["train"]["crowd_images"]:
                agree += int((gt == pl).sum())
                total += gt.size
    assert 0.75 < agree / total < 0.99  # aligned with the GT, with first-stage-like errors


def test_same_args_same_bytes(built, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    make_synthetic_coco_from_config(again, SYN, progress=False)
    a, b = _tree(root), _tree(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = tmp_path / "other"
    make_synthetic_coco(other, **{**ARGS, "seed": 1})
    c = _tree(other)
    assert c["train2014/COCO_train2014_000000000009.jpg"] != a["train2014/COCO_train2014_000000000009.jpg"]


def test_reuse_refuse_and_overwrite(tmp_path):
    root = tmp_path / "coco"
    make_synthetic_coco_from_config(root, SYN, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = make_synthetic_coco_from_config(root, SYN, progress=False)
    assert again["prepare"]["splits"]["train"]["up_to_date"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes  # nothing rewritten

    smaller = SimpleNamespace(**{**vars(SYN), "train": 5})
    with pytest.raises(FileExistsError, match="differs in: train"):
        make_synthetic_coco_from_config(root, smaller, progress=False)
    s = make_synthetic_coco_from_config(root, smaller, overwrite=True, progress=False)
    assert s["settings"]["train"] == 5 and s["prepare"]["splits"]["train"]["masks_written"] == 5
    ids = synthetic_image_ids(5, 4)
    assert sorted(int(p.stem) for p in (root / "mask/train2014").glob("*.png")) == ids["train"]
    assert sorted(image_id_of(p.stem) for p in (root / "train2014").glob("*.jpg")) == ids["train"]
    assert sorted(image_id_of(p.stem) for p in (root / "irn_pseudo_label").glob("*.png")) == ids["train"]
    # the val ids changed too (they follow train's); no stale val mask survives
    assert sorted(int(p.stem) for p in (root / "mask/val2014").glob("*.png")) == ids["val"]
    gt = np.asarray(Image.open(root / "mask/val2014" / f"{ids['val'][0]}.png"))
    assert gt.shape == tuple(reversed(Image.open(root / "val2014" / f"{stem_of('val', ids['val'][0])}.jpg").size))


def test_refuses_foreign_tree_and_bad_args(tmp_path):
    (tmp_path / "real" / "annotations").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not made by this generator"):
        make_synthetic_coco(tmp_path / "real", **ARGS)
    with pytest.raises(ValueError, match="train, val >= 3"):
        make_synthetic_coco(tmp_path / "x", **{**ARGS, "val": 2})
    with pytest.raises(ValueError, match="classes"):
        make_synthetic_coco(tmp_path / "x", **{**ARGS, "classes": 21})


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--train", "4", "--val", "3", "--size", "48", "48", "--classes", "3", "--quiet"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "train2014 4 images" in text and "categories [15, 46, 76] = labels [14, 41, 67]" in text
    assert (out / "mask/val2014").is_dir() and len(list((out / "mask/val2014").glob("*.png"))) == 3
    assert cli.main(argv[:-1] + ["--seed", "3", "--quiet"]) == 2
    assert "differs in: seed" in capsys.readouterr().err

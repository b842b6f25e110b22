"""Importing pseudo-labels from any first stage (datasets/label_import.py): our own synthetic
labels exported to each foreign format, imported back, and checked against the rule, the
manifest, the import errors and the quality numbers computed directly with utils/metrics."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import label_import
from datasets.build import dataset_entry
from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR, mask_precision, precision_counts
from datasets.label_import import (MANIFEST_NAME, QUALITY_JSON, QUALITY_MD, Source, Target, boundary_band,
                                   check_manifest, import_labels, read_manifest)
from datasets.readers import read_label, read_mask
from engine.config import load_config
from engine.results_card import pseudo_label_quality
from tests.conftest import REPO
from utils.errors import ConfigError, DataError, OutputExistsError
from utils.metrics import confusion_matrix, segmentation_scores
from utils.voc import voc_palette

K = 3  # foreground classes of the synthetic set


@pytest.fixture(scope="module")
def syn(synthetic_set) -> Path:
    """The shared synthetic set, read only: the error tests break a copy of it."""
    return synthetic_set("voc", train=6, val=2, test=0, size=(40, 48), classes=K, seed=4)


def ours(root: Path, item_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Our own label and mask (0/1) of one id."""
    label = np.asarray(Image.open(root / PSEUDO_LABEL_DIR / f"{item_id}.png"))
    mask = np.asarray(read_mask(root / MASK_DIR / f"{item_id}.png", item_id))
    return label, mask


def ids_of(root: Path) -> list[str]:
    return (root / "VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split()


def export(root: Path, out: Path, kind: str) -> Path:
    """Our labels in a foreign format: palette PNG, grey PNG with 255 on unreliable pixels,
    grey label-only, or label-only plus score maps (.npy, and .npz under key 'prob')."""
    out.mkdir(parents=True)
    for n, i in enumerate(ids_of(root)):
        label, mask = ours(root, i)
        if kind == "palette":
            img = Image.fromarray(label, mode="L").convert("P")
            img.putpalette(voc_palette().reshape(-1).tolist())
            img.save(out / f"{i}.png")
        elif kind == "png255":
            Image.fromarray(np.where(mask > 0, label, 255).astype(np.uint8), mode="L").save(out / f"{i}.png")
        else:
            Image.fromarray(label, mode="L").save(out / f"{i}.png")
        if kind == "scores":
            # Probability 0.9 on our label where our mask keeps the pixel, 0.4 where it does not;
            # the rest spread evenly over the other classes.
            top = np.where(mask > 0, 0.9, 0.4).astype(np.float32)
            probs = np.repeat(((1 - top) / K)[None], K + 1, axis=0)
            np.put_along_axis(probs, label[None].astype(np.int64), top[None], axis=0)
            if n % 2:
                np.savez(out / f"{i}.npz", prob=probs)
            else:
                np.save(out / f"{i}.npy", probs)
    return out


def run_import(root: Path, out: Path, source: Source, split: str = "train_aug", **kw) -> dict:
    entry = dataset_entry("voc")
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={root}", "data.synthetic=null", f"data.num_classes={K + 1}"])
    files = entry.files(cfg.data, split)
    return import_labels(source, files, Target(root, str(out / "labels"), str(out / "masks")), dataset="voc",
                         split=split, num_classes=K + 1, class_names=entry.class_names(K + 1),
                         gt_ignore=entry.gt_ignore_index, producer=kw.pop("producer", "test"), **kw)


def imported(out: Path, item_id: str) -> tuple[np.ndarray, np.ndarray]:
    label = Image.open(out / "labels" / f"{item_id}.png")
    assert label.mode == "L"  # grey-index, whatever the input was
    return np.asarray(label), np.asarray(read_mask(out / "masks" / f"{item_id}.png", item_id))


# ----------------------------------------------------------------------------- the rules


def test_boundary_band_marks_k_pixels_each_side_of_a_hand_drawn_boundary():
    label = np.zeros((7, 9), dtype=np.uint8)
    label[:, 5:] = 2          # a vertical boundary between columns 4 and 5
    label[0, 0] = 1           # a one-pixel island in the corner
    band1 = boundary_band(label, 1)
    expected = np.zeros((7, 9), dtype=bool)
    expected[:, 4:6] = True                 # one column on each side of the boundary
    expected[0:2, 0:2] = True               # the island and its 8-neighbours inside the image
    assert np.array_equal(band1, expected)
    band2 = boundary_band(label, 2)
    expected2 = np.zeros((7, 9), dtype=bool)
    expected2[:, 3:7] = True
    expected2[0:3, 0:3] = True
    assert np.array_equal(band2, expected2)
    assert not boundary_band(label, 0).any()
    assert not boundary_band(np.full((5, 5), 3, np.uint8), 2).any()  # the image border is no boundary


def test_png255_import_gives_back_our_mask_and_keeps_255(syn, tmp_path):
    src = export(syn, tmp_path / "clip", "png255")
    manifest = run_import(syn, tmp_path, Source("png255", src))
    unreliable = 0
    for i in ids_of(syn):
        label, mask = ours(syn, i)
        got_label, got_mask = imported(tmp_path, i)
        assert np.array_equal(got_mask, mask)
        assert np.array_equal(got_label, np.where(mask > 0, label, 255))
        unreliable += int((mask == 0).sum())
    assert manifest["rule"] == {"name": "uncertain-255", "default_for_format": True,
                                "label_255": "unreliable (mask 0), label kept"}
    assert manifest["counts"]["uncertain_255"] == unreliable
    assert manifest["kept_share"] == pytest.approx(1 - unreliable / manifest["counts"]["pixels"])


def test_our_layout_imports_unchanged(syn, tmp_path):
    manifest = run_import(syn, tmp_path, Source("ours", syn / PSEUDO_LABEL_DIR, masks=syn / MASK_DIR))
    for i in ids_of(syn):
        assert all(np.array_equal(a, b) for a, b in zip(imported(tmp_path, i), ours(syn, i)))
    assert manifest["rule"]["name"] == "given" and manifest["counts"]["uncertain_255"] == 0


@pytest.mark.parametrize("rule, width", [("all", None), ("boundary", 2), ("boundary", None)])
def test_palette_label_only_import_by_rule(syn, tmp_path, rule, width):
    src = export(syn, tmp_path / "palette", "palette")
    extra = {} if width is None else {"boundary_width": width}
    manifest = run_import(syn, tmp_path, Source("labels", src, rule=rule, **extra))
    k = manifest["rule"].get("width")
    assert manifest["rule"]["name"] == rule and manifest["rule"]["default_for_format"] == (rule == "boundary")
    if rule == "boundary":
        assert k == (width if width is not None else 5)  # the stated default
    hist = np.zeros(K + 1, dtype=np.int64)
    for i in ids_of(syn):
        label, _ = ours(syn, i)
        got_label, got_mask = imported(tmp_path, i)
        assert np.array_equal(got_label, label)
        expected = np.ones_like(label) if rule == "all" else (~boundary_band(label, k)).astype(np.uint8)
        assert np.array_equal(got_mask, expected)
        hist += np.bincount(label.ravel(), minlength=K + 1)
    assert manifest["class_histogram"] == hist.tolist()


def test_score_maps_threshold_the_top_probability(syn, tmp_path):
    src = export(syn, tmp_path / "scores", "scores")
    manifest = run_import(syn, tmp_path, Source("scores", src, scores=src, score_key="prob"))
    assert manifest["rule"] == {"name": "top-probability", "threshold": 0.5, "default_for_format": True,
                                "label_255": "unreliable (mask 0), label kept"}
    for i in ids_of(syn):
        assert np.array_equal(imported(tmp_path, i)[1], ours(syn, i)[1])  # 0.9 kept, 0.4 dropped
    shutil.rmtree(tmp_path / "labels"), shutil.rmtree(tmp_path / "masks")
    run_import(syn, tmp_path, Source("scores", src, scores=src, score_key="prob", score_threshold=0.3))
    assert all(imported(tmp_path, i)[1].all() for i in ids_of(syn))


def test_a_rule_the_format_does_not_have_is_refused(syn, tmp_path):
    with pytest.raises(ConfigError, match="rule 'boundary' does not apply to format 'png255'"):
        run_import(syn, tmp_path, Source("png255", syn / PSEUDO_LABEL_DIR, rule="boundary"))


# ----------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_check_manifest_names_changed_missing_and_added_files(syn, tmp_path):
    src = export(syn, tmp_path / "clip", "png255")
    manifest = run_import(syn, tmp_path, Source("png255", src), producer="CLIP-ES")
    labels, masks = tmp_path / "labels", tmp_path / "masks"
    assert read_manifest(labels) == json.loads(json.dumps(manifest))
    assert manifest["format"] == 1 and manifest["producer"] == "CLIP-ES"
    assert manifest["dataset"] == "voc" and manifest["split"] == "train_aug"
    assert manifest["source"]["labels"] == str(src.resolve()) and manifest["mask_dir"] == str(masks)
    ids = ids_of(syn)
    assert manifest["counts"]["ids"] == len(ids)
    assert sorted(manifest["files"]["labels"]) == sorted(f"{i}.png" for i in ids)
    for name, digest in manifest["files"]["masks"].items():
        assert hashlib.sha256((masks / name).read_bytes()).hexdigest() == digest
    check_manifest(labels, masks)  # unchanged: passes

    changed = labels / f"{ids[1]}.png"
    Image.fromarray(np.zeros((40, 48), np.uint8), mode="L").save(changed)
    (masks / f"{ids[2]}.png").unlink()
    shutil.copy(changed, labels / "extra.png")
    with pytest.raises(DataError) as e:
        check_manifest(labels, masks)
    msg = str(e.value)
    assert f"1 changed: {changed}" in msg and f"1 missing: {masks / (ids[2] + '.png')}" in msg
    assert f"1 added: {labels / 'extra.png'}" in msg


def test_many_changed_files_are_named_first_few_and_counted(syn, tmp_path):
    run_import(syn, tmp_path, Source("labels", syn / PSEUDO_LABEL_DIR, rule="all"))
    for p in sorted((tmp_path / "masks").glob("*.png")):
        Image.fromarray(np.zeros((40, 48), np.uint8), mode="L").save(p)
    with pytest.raises(DataError, match=r"6 changed: .*\.png \(and 1 more\)"):
        check_manifest(tmp_path / "labels", tmp_path / "masks")


def test_no_manifest_is_an_error(tmp_path):
    with pytest.raises(DataError, match=f"no {MANIFEST_NAME} in"):
        check_manifest(tmp_path, tmp_path)


def test_an_earlier_import_is_refused_unless_overwrite_and_a_foreign_folder_always(syn, tmp_path):
    src = syn / PSEUDO_LABEL_DIR
    run_import(syn, tmp_path, Source("labels", src, rule="all"), producer="first")
    with pytest.raises(OutputExistsError, match="holds an earlier import .* pass --overwrite"):
        run_import(syn, tmp_path, Source("labels", src, rule="boundary"))
    run_import(syn, tmp_path, Source("labels", src, rule="boundary"), producer="second", overwrite=True)
    assert read_manifest(tmp_path / "labels")["producer"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # Our synthetic set's own folders were made by no import: refused even with --overwrite.
    entry = dataset_entry("voc")
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={syn}", "data.synthetic=null", f"data.num_classes={K + 1}"])
    with pytest.raises(OutputExistsError, match="no label import made"):
        import_labels(Source("labels", src, rule="all"), entry.files(cfg.data, "train_aug"),
                      Target(syn, PSEUDO_LABEL_DIR, MASK_DIR), dataset="voc", split="train_aug",
                      num_classes=K + 1, class_names=[], gt_ignore=255, producer="x", overwrite=True)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def broken(syn, tmp_path) -> tuple[Path, Path]:
    """A copy of the set and a label folder to break, one id per problem."""
    root = tmp_path / "data"
    shutil.copytree(syn / "VOC2012", root / "VOC2012")
    labels = export(syn, tmp_path / "labels_in", "grey")
    return root, labels


def _expect_refusal(root: Path, tmp_path: Path, source: Source, *needles: str) -> None:
    with pytest.raises(DataError) as e:
        run_import(root, tmp_path / "out", source)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert "nothing was written" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written, no temporary folder


def test_every_import_error_is_named_before_anything_is_written(broken, tmp_path):
    root, labels = broken
    ids = ids_of(root)
    (root / "VOC2012/JPEGImages" / f"{ids[0]}.jpg").unlink()
    (labels / f"{ids[1]}.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(labels / f"{ids[2]}.png")
    Image.fromarray(np.full((40, 48), K + 1, np.uint8), mode="L").save(labels / f"{ids[3]}.png")
    img = Image.fromarray(np.ones((40, 48), np.uint8), mode="P")
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)  # index 1 is not VOC's (128, 0, 0)
    img.save(labels / f"{ids[4]}.png")
    _expect_refusal(root, tmp_path, Source("labels", labels),
                    f"ids without images (1): '{ids[0]}': {root / 'VOC2012/JPEGImages' / (ids[0] + '.jpg')}",
                    f"images without labels (1): '{ids[1]}': {labels / (ids[1] + '.png')}",
                    f"label size != image size (1): '{ids[2]}': {labels / (ids[2] + '.png')} is 10x10, the image 48x40",
                    f"has values [{K + 1}] outside 0..{K} and 255: {labels / (ids[3] + '.png')}",
                    f"unknown palettes (1): label for id '{ids[4]}' is a palette PNG whose palette is not the data "
                    f"set's (VOC's): index 1 is (10, 200, 30), VOC's is (128, 0, 0)")


def test_score_maps_of_the_wrong_shape_are_refused(broken, tmp_path):
    root, labels = broken
    ids = ids_of(root)
    np.save(labels / f"{ids[0]}.npy", np.zeros((K, 40, 48), np.float32))        # a class short
    np.save(labels / f"{ids[1]}.npy", np.zeros((K + 1, 20, 24), np.float32))    # half size
    np.save(labels / f"{ids[2]}.npy", np.full((K + 1, 40, 48), 3.0, np.float32))  # logits, not probabilities
    for i in ids[3:]:
        np.save(labels / f"{i}.npy", np.full((K + 1, 40, 48), 0.25, np.float32))
    _expect_refusal(root, tmp_path, Source("scores", labels, scores=labels),
                    f"score maps of the wrong shape (2): '{ids[0]}': {labels / (ids[0] + '.npy')} is ({K}, 40, 48), "
                    f"expected ({K + 1}, 40, 48) (C, H, W)", f"is ({K + 1}, 20, 24)",
                    f"score maps not probabilities in [0, 1] (1): '{ids[2]}': {labels / (ids[2] + '.npy')} ranges 3..3")


def test_a_failure_while_writing_leaves_nothing_behind(syn, tmp_path, monkeypatch):
    real = label_import.save_mask
    calls = []

    def failing(path, mask):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path, mask)
    monkeypatch.setattr(label_import, "save_mask", failing)
    with pytest.raises(OSError, match="disk full"):
        run_import(syn, tmp_path / "out", Source("labels", syn / PSEUDO_LABEL_DIR, rule="all"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- quality report


def test_quality_report_equals_the_numbers_computed_directly_and_the_training_card(syn, tmp_path):
    src = export(syn, tmp_path / "clip", "png255")
    run_import(syn, tmp_path, Source("png255", src))
    q = json.loads((tmp_path / "labels" / QUALITY_JSON).read_text())
    ids = ids_of(syn)
    assert q["computed_on"] == f"{len(ids)} ids of train_aug with ground truth, of {len(ids)} imported"

    # Directly, with the shared metric code, on the same pixels: label 255 an extra "no
    # prediction" column (a miss of the gt class); gt void left out.
    n = K + 1
    conf = torch.zeros(n + 1, n + 1, dtype=torch.long)
    counts = dict.fromkeys(("kept_valid", "kept_correct", "unkept_valid", "unkept_correct"), 0)
    kept = valid_total = 0
    for i in ids:
        gt = np.asarray(read_label(syn / "VOC2012/SegmentationClass" / f"{i}.png", i, n, "gt"))
        label, mask = imported(tmp_path, i)
        conf += confusion_matrix(torch.from_numpy(np.where(label == 255, n, label).astype(np.int64)),
                                 torch.from_numpy(gt.astype(np.int64)), n + 1)
        for k, v in precision_counts(label, mask, gt, (gt != 255) & (label != 255)).items():
            counts[k] += v
        kept += int(((mask > 0) & (gt != 255)).sum())
        valid_total += int((gt != 255).sum())
    direct = segmentation_scores(conf)
    labelled = segmentation_scores(conf[:n, :n])
    assert q["miou"] == pytest.approx(direct["miou"], abs=1e-12)
    assert q["miou_labelled_only"] == pytest.approx(labelled["miou"], abs=1e-12)
    assert q["miou"] < q["miou_labelled_only"]  # the 255 pixels count as misses
    assert q["kept_share"] == pytest.approx(kept / valid_total)
    assert q["kept_precision"] == pytest.approx(mask_precision(counts)["kept_precision"])
    assert q["dropped_precision"] is None  # every dropped pixel is 255: no labelled dropped pixel
    c = conf.numpy()
    for row, k in zip(q["per_class"], range(n)):
        assert row["precision"] == pytest.approx(c[k, k] / c[:n, k].sum())
        assert row["recall"] == pytest.approx(c[k, k] / c[k].sum())
        assert row["iou"] == pytest.approx(direct["iou"][k])
    md = (tmp_path / "labels" / QUALITY_MD).read_text()
    assert f"Computed on {q['computed_on']}." in md and "label 255 counted as no prediction" in md

    # The training run's card on the imported folders: the same numbers on its rule.
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={syn}", "data.synthetic=null", f"data.num_classes={n}",
                                                   f"data.pseudo_label_dir={tmp_path / 'labels'}",
                                                   f"data.mask_dir={tmp_path / 'masks'}"])
    card = pseudo_label_quality(cfg, tmp_path / "run")
    assert card["miou"] == pytest.approx(q["miou_labelled_only"], abs=1e-12)
    assert card["mask_kept_fraction"] == pytest.approx(1.0)  # the card counts labelled pixels only


def test_our_labels_score_as_the_training_card_scores_them(syn, tmp_path):
    run_import(syn, tmp_path, Source("ours", syn / PSEUDO_LABEL_DIR, masks=syn / MASK_DIR))
    q = json.loads((tmp_path / "labels" / QUALITY_JSON).read_text())
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.root={syn}", "data.synthetic=null", f"data.num_classes={K + 1}"])
    card = pseudo_label_quality(cfg, tmp_path / "run")  # our own folders, as training reads them
    assert q["miou"] == q["miou_labelled_only"] == pytest.approx(card["miou"], abs=1e-12)
    assert q["kept_precision"] == pytest.approx(card["kept_precision"], abs=1e-12)
    assert q["dropped_precision"] == pytest.approx(card["dropped_precision"], abs=1e-12)
    assert q["kept_share"] == pytest.approx(card["mask_kept_fraction"], abs=1e-12)


def test_a_split_without_ground_truth_gets_a_card_without_numbers(syn, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(syn / "VOC2012", root / "VOC2012")
    shutil.rmtree(root / "VOC2012/SegmentationClass")
    run_import(root, tmp_path, Source("labels", syn / PSEUDO_LABEL_DIR, rule="all"))
    q = json.loads((tmp_path / "labels" / QUALITY_JSON).read_text())
    assert q["ids_with_ground_truth"] == 0 and "miou" not in q
    assert "No quality numbers: no id of train_aug has a ground-truth file." in (
        tmp_path / "labels" / QUALITY_MD).read_text()


def test_label_255_is_unreliable_under_every_rule(syn, tmp_path):
    """Our layout with 255 written into a label under mask 1: the import keeps the 255 and drops the pixel."""
    i = ids_of(syn)[0]
    labels = export(syn, tmp_path / "in", "grey")
    label, mask = ours(syn, i)
    hole = (slice(0, 4), slice(0, 4))
    assert mask[hole].any()  # some of the hole was reliable before
    edited = label.copy()
    edited[hole] = 255
    Image.fromarray(edited, mode="L").save(labels / f"{i}.png")
    run_import(syn, tmp_path, Source("ours", labels, masks=syn / MASK_DIR))
    got_label, got_mask = imported(tmp_path, i)
    assert np.array_equal(got_label, edited)
    expected = mask.copy()
    expected[hole] = 0
    assert np.array_equal(got_mask, expected)


def test_an_npz_with_several_arrays_needs_its_key(broken, tmp_path):
    root, labels = broken
    for i in ids_of(root):
        np.savez(labels / f"{i}.npz", prob=np.full((K + 1, 40, 48), 0.25, np.float32), cam=np.zeros((K, 40, 48)))
    _expect_refusal(root, tmp_path, Source("scores", labels, scores=labels),
                    "score maps unreadable (6)", "holds ['prob', 'cam']; name one (--score-key)")
    manifest = run_import(root, tmp_path / "out", Source("scores", labels, scores=labels, score_key="prob"))
    assert manifest["source"]["score_key"] == "prob" and manifest["kept_share"] == 0.0  # top 0.25 < 0.5

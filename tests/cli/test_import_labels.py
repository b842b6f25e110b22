"""tools/import_labels.py end to end: a 255-format label set made from the synthetic data,
imported by the command line (in-process), its messages and exit codes; and one epoch of BECO
trained on it (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.label_import import MANIFEST_NAME, QUALITY_JSON, QUALITY_MD, check_manifest
from datasets.readers import read_mask
from tests.conftest import REPO
from utils.voc import voc_palette
from tools import import_labels

K = 3


@pytest.fixture(scope="module")
def syn(synthetic_set) -> Path:
    return synthetic_set("voc", train=16, val=6, test=2, size=(64, 64), classes=K, seed=0)


def clip_style(root: Path, out: Path) -> Path:
    """Our labels with 255 wherever our mask says unreliable: what CLIP-based producers write."""
    return clip_style_from(root / PSEUDO_LABEL_DIR, root / MASK_DIR, out)


def clip_style_from(labels: Path, masks: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for p in sorted(labels.glob("*.png")):
        label = np.asarray(Image.open(p))
        mask = np.asarray(read_mask(masks / p.name, p.stem))
        Image.fromarray(np.where(mask > 0, label, 255).astype(np.uint8), mode="L").save(out / p.name)
    return out


def argv(root: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "voc", "--config", str(REPO / "configs/demo.yaml"), "--format", "png255",
            "--labels", str(labels), "--producer", "CLIP-style", *extra,
            f"data.root={root}", "data.synthetic=null", f"data.num_classes={K + 1}",
            f"data.pseudo_label_dir={out / 'clip_label'}", f"data.mask_dir={out / 'clip_mask'}"]


def test_cli_imports_a_255_set_and_refuses_a_second_import(syn, tmp_path, capsys):
    labels = clip_style(syn, tmp_path / "clip")
    assert import_labels.main(argv(syn, labels, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "imported 16 ids of voc train_aug (png255, rule uncertain-255)" in out
    assert f"data.pseudo_label_dir={tmp_path / 'clip_label'}" in out
    for name in (MANIFEST_NAME, QUALITY_MD, QUALITY_JSON):
        assert (tmp_path / "clip_label" / name).is_file()
    check_manifest(tmp_path / "clip_label", tmp_path / "clip_mask")
    q = json.loads((tmp_path / "clip_label" / QUALITY_JSON).read_text())
    assert q["computed_on"] == "16 ids of train_aug with ground truth, of 16 imported"

    assert import_labels.main(argv(syn, labels, tmp_path)) == 1
    assert "holds an earlier import" in capsys.readouterr().err
    assert import_labels.main(argv(syn, labels, tmp_path, "--overwrite", "--split", "train")) == 0
    manifest = json.loads((tmp_path / "clip_label" / MANIFEST_NAME).read_text())
    assert manifest["split"] == "train" and manifest["counts"]["ids"] == 8


def test_cli_errors_are_one_message_and_an_exit_code(syn, tmp_path, capsys):
    labels = clip_style(syn, tmp_path / "clip")
    (labels / "2007_000003.png").unlink()
    assert import_labels.main(argv(syn, labels, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("import_labels: error: the import of") and "nothing was written" in err
    assert f"images without labels (1): '2007_000003': {labels / '2007_000003.png'}" in err
    assert not (tmp_path / "clip_label").exists()
    assert import_labels.main(argv(syn, labels, tmp_path, "--rule", "all")) == 2
    assert "rule 'all' does not apply to format 'png255'" in capsys.readouterr().err
    assert import_labels.main(["--dataset", "nope", "--format", "labels", "--labels", str(labels),
                               "--producer", "x"]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_beco_trains_an_epoch_on_an_imported_255_set(syn, tmp_path):
    """Label 255 under mask 0 goes through the second stage's preflight, loader and step (what
    the step does with those pixels is tested in tests/engine)."""
    labels = clip_style(syn, tmp_path / "clip")
    assert import_labels.main(argv(syn, labels, tmp_path)) == 0
    args = ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(tmp_path / "logs"),
            "--logging_tag", "clip", f"data.root={syn}", "data.synthetic=null", f"data.num_classes={K + 1}",
            f"data.pseudo_label_dir={tmp_path / 'clip_label'}", f"data.mask_dir={tmp_path / 'clip_mask'}",
            "data.crop_size=64", "data.val_size=64", "data.batch_size=4", "data.num_workers=0",
            "train.epochs=1", "train.num_vis=0", "method.warmup_epochs=0", "method.co_training_start_epoch=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    iters = [json.loads(line) for line in (tmp_path / "logs/clip/train_log.jsonl").read_text().splitlines()]
    assert len(iters) == 4 and all(np.isfinite(rec["total"]) for rec in iters)


def test_training_refuses_labels_changed_since_their_import(syn, tmp_path):
    """The second stage's preflight checks an imported set against its manifest: a label edited
    after the import stops main.py before any training, naming the file."""
    labels = clip_style(syn, tmp_path / "clip")
    assert import_labels.main(argv(syn, labels, tmp_path)) == 0
    edited = sorted((tmp_path / "clip_label").glob("*.png"))[0]
    label = np.asarray(Image.open(edited)).copy()
    label[0, 0] = 0 if label[0, 0] != 0 else 1
    Image.fromarray(label, mode="L").save(edited)
    args = ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(tmp_path / "logs"),
            "--logging_tag", "edited", f"data.root={syn}", "data.synthetic=null", f"data.num_classes={K + 1}",
            f"data.pseudo_label_dir={tmp_path / 'clip_label'}", f"data.mask_dir={tmp_path / 'clip_mask'}",
            "data.num_workers=0"]
    r = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"differ from their manifest ({tmp_path / 'clip_label' / MANIFEST_NAME}) since the import: " \
           f"1 changed: {edited}; import them again" in r.stderr
    assert not (tmp_path / "logs/edited/train_log.jsonl").exists()


@pytest.mark.slow
def test_our_first_stages_labels_in_every_format_report_its_own_numbers_and_train(tmp_path):
    """Issue 25's acceptance on the synthetic VOC set: the labels our first stage exports,
    written in each foreign format (ours, grey and palette label-only, with its random-walk
    scores, the 255 format) and imported, report what the first stage itself reported on the
    same pixels (eval_sem_seg's mIoU on train, gen_mask's kept share and precisions on
    train_aug), and BECO trains an epoch on an imported set."""
    # Imported here: the first stage's driver, and its test module's tiny data and seeds.
    from irn import run_sample
    from tests.first_stage.test_first_stage_b import _seed_outputs_from_gt, _tiny_voc
    voc = _tiny_voc(tmp_path)  # 8 train_aug ids, 4 of them in train; 3 classes
    root, work, out = voc.parent, tmp_path / "work", tmp_path / "out"
    ids = (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    for d in ("ir_label", "cam"):
        (work / "result" / d).mkdir(parents=True)
    _seed_outputs_from_gt(voc, work, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no ImageNet weights here: said, and expected
        own = run_sample.main(["--voc12_root", str(voc), "--work_dir", str(work), "--device", "cpu",
                               "--num_workers", "0", "--steps", "train_irn,make_sem_seg,eval_sem_seg,gen_mask,export",
                               "--export_to", str(out), "--backbone_depth", "18", "--irn_crop_size", "64",
                               "--irn_batch_size", "4", "--irn_num_epoches", "1", "--radius", "5", "--no_progress"])
    labels, masks = out / PSEUDO_LABEL_DIR, out / MASK_DIR
    png255 = clip_style_from(labels, masks, tmp_path / "png255")
    palette = tmp_path / "palette"
    palette.mkdir()
    for p in sorted(labels.glob("*.png")):
        im = Image.fromarray(np.asarray(Image.open(p)), mode="P")  # the same indices, VOC's colours
        im.putpalette(voc_palette().reshape(-1).tolist())
        im.save(palette / p.name)

    def imported(fmt: str, source: Path, split: str, name: str, *extra: str) -> dict:
        assert import_labels.main(["--dataset", "voc", "--config", str(REPO / "configs/demo.yaml"), "--split", split,
                                   "--format", fmt, "--labels", str(source), "--producer", "our first stage", *extra,
                                   f"data.root={root}", "data.synthetic=null", "data.num_classes=4",
                                   f"data.pseudo_label_dir={name}_label", f"data.mask_dir={name}_mask"]) == 0
        quality = json.loads((root / f"{name}_label" / QUALITY_JSON).read_text())
        return {**quality, "manifest_kept_share": json.loads((root / f"{name}_label" / MANIFEST_NAME).read_text())["kept_share"]}

    scores = tmp_path / "scores"  # make_sem_seg's random-walk scores, one channel per class (absent ones 0)
    scores.mkdir()
    for p in sorted((work / "result" / "score").glob("*.pt")):
        saved = torch.load(p, weights_only=True)
        full = np.zeros((4, *saved["score"].shape[1:]), np.float32)
        full[saved["keys"].numpy()] = saved["score"].numpy()
        np.save(scores / f"{p.stem}.npy", full)

    miou, mask = own["eval_sem_seg"]["sem_seg_miou"], own["gen_mask"]
    # Every label, on eval_sem_seg's ids (train): the same mIoU, whatever the format.
    for fmt, source, extra in (("ours", labels, ["--masks", str(masks)]), ("labels", labels, ["--rule", "all"]),
                               ("labels", palette, ["--rule", "all"]), ("scores", labels, ["--scores", str(scores)])):
        q = imported(fmt, source, "train", f"{fmt}_{source.name}_train", *extra)
        assert q["split"] == "train"
        assert q["computed_on"] == "4 ids of train with ground truth, of 4 imported"
        assert q["miou"] == pytest.approx(miou, abs=1e-12)
    # gen_mask's numbers, on its ids (train_aug): the masks' kept share and label precisions.
    ours = imported("ours", labels, "train_aug", "ours_aug", "--masks", str(masks))
    clip = imported("png255", png255, "train_aug", "png255_aug")
    for q in (ours, clip):
        assert q["manifest_kept_share"] == mask["kept_fraction"]
        assert q["kept_precision"] == pytest.approx(mask["kept_precision"], abs=1e-12)
    assert ours["dropped_precision"] == pytest.approx(mask["unkept_precision"], abs=1e-12)

    args = ["--config", str(REPO / "configs/demo.yaml"), "--logging_path_base", str(tmp_path / "logs"),
            "--logging_tag", "fs", f"data.root={root}", "data.synthetic=null", "data.num_classes=4",
            "data.pseudo_label_dir=png255_aug_label", "data.mask_dir=png255_aug_mask", "data.crop_size=48",
            "data.val_size=48", "data.batch_size=4", "data.num_workers=0", "train.epochs=1", "train.num_vis=0",
            "method.warmup_epochs=0", "method.co_training_start_epoch=0"]
    r = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    iters = [json.loads(line) for line in (tmp_path / "logs/fs/train_log.jsonl").read_text().splitlines()]
    assert len(iters) == 2 and all(np.isfinite(rec["total"]) for rec in iters)

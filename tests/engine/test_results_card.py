"""The results card (engine/results_card.py): every number main.py --test and test.py put on it
equals an independent computation from the nets and the files; rows merge across tools; a card
never mixes two checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.synthetic.voc import make_synthetic_voc
from engine import checkpoint as ckpt_io
from tests.conftest import REPO, eval_nets
from engine.config import load_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
NUM_CLASSES = 4
SCALE = 0.5
# 48x64 images tested at 64x64: the card's original-resolution rule must upsample to 48x64.
OVERRIDES = ["data.synthetic=null", f"data.num_classes={NUM_CLASSES}", "data.crop_size=64", "data.val_size=64",
             "data.num_workers=0", f"test.scales=[{SCALE}]", "test.card_inference=[single,msc+flip]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "data"
    make_synthetic_voc(out, train=4, val=5, test=1, size=(48, 64), classes=NUM_CLASSES - 1, seed=3)
    return out


def _cfg(root: Path):
    return load_config(REPO / "configs/demo.yaml", [f"data.root={root}", *OVERRIDES])


@pytest.fixture(scope="module")
def nets(root):
    return eval_nets(_cfg(root), 1)


def _main(argv: list[str]) -> None:
    import main as main_mod
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main_mod.main(argv)
    assert rc == 0, err.getvalue()[-3000:]


def _test_py(*args: str) -> None:
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    spec = importlib.util.spec_from_file_location("beco_card_cli", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(io.StringIO()):
            assert module.main(list(args)) == 0
    finally:
        sys.modules.pop(spec.name, None)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _ids(root: Path, split: str) -> list[str]:
    return (root / "VOC2012/ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def _miou_by_pixel_sets(preds: list[np.ndarray], gts: list[np.ndarray]) -> float:
    """Per class |P ∩ G| / |P ∪ G| over all images, void (255) ignored, classes absent from G skipped."""
    inter, union, present = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES, bool)
    for p, g in zip(preds, gts):
        valid = g != 255
        for c in range(NUM_CLASSES):
            pc, gc = (p == c) & valid, (g == c) & valid
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
            present[c] |= gc.any()
    return float(np.mean(inter[present] / union[present]))


@torch.no_grad()
def _independent(nets, root: Path) -> dict[tuple[str, str], float]:
    """Card mIoUs recomputed straight from the nets: per net and averaged, single scale and
    multi-scale (max over the base and the 0.5-scaled map) with flip, upsampled to each image's size."""
    from datasets.segmentation import EvalSet
    cfg = _cfg(root)
    data = EvalSet(cfg.data, "val", with_labels=True, full_labels=True)
    preds: dict[tuple[str, str], list[np.ndarray]] = {}
    gts = []
    for k in range(len(data)):
        item = data[k]
        x = item["image"][None]
        gt = item["full_label"].numpy()
        gts.append(gt)

        def pre(x_in: torch.Tensor, members: list[int]) -> torch.Tensor:
            return sum(nets[m](x_in)["pre_logits"] for m in members) / len(members)

        def flipped(x_in: torch.Tensor, members: list[int]) -> torch.Tensor:
            return (pre(x_in, members) + pre(x_in.flip(-1), members).flip(-1)) / 2

        for name, members in (("net1", [0]), ("net2", [1]), ("mean", [0, 1])):
            base = pre(x, members)
            small = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            msc = torch.maximum(flipped(x, members), F.interpolate(flipped(small, members), size=base.shape[-2:],
                                                                   mode="bilinear", align_corners=False))
            for inference, m in (("single", base), ("msc+flip", msc)):
                up = F.interpolate(m, size=gt.shape, mode="bilinear", align_corners=False)
                preds.setdefault((name, inference), []).append(up.argmax(1)[0].numpy())
    return {key: _miou_by_pixel_sets(p, gts) for key, p in preds.items()}


def _pseudo_label_miou(root: Path) -> float:
    ids = _ids(root, "train_aug")
    gts = [np.asarray(Image.open(root / "VOC2012/SegmentationClass" / f"{i}.png")) for i in ids]
    pls = [np.asarray(Image.open(root / "irn_pseudo_label" / f"{i}.png")) for i in ids]
    gts = [np.where(p == 255, 255, g) for g, p in zip(gts, pls)]  # pseudo-label void left out
    return _miou_by_pixel_sets(pls, gts)


def test_card_numbers_equal_an_independent_computation(root, nets, tmp_path):
    ckpt = tmp_path / "best_ckpt.pth"
    ckpt_io.save_best(ckpt, nets)
    base = ["--config", str(REPO / "configs/demo.yaml"), "--test", "--ckpt", str(ckpt), "--logging_path_base",
            str(tmp_path), "--logging_tag", "run", f"data.root={root}", *OVERRIDES]
    _main(base)
    run = tmp_path / "run"
    card = json.loads((run / "results.json").read_text())
    expected = _independent(nets, root)
    rows = card["rows"]
    for (net, inference), miou in expected.items():
        assert rows[f"{net}|{inference}|no_crf|original"]["miou"] == pytest.approx(miou, abs=1e-9), (net, inference)
    assert len({round(v, 6) for v in expected.values()}) > 3  # the rows are not one number copied
    assert rows["mean|single|no_crf|64px"]["miou"] == json.loads((run / "logits_scores.json").read_text())["miou"]
    assert card["class_names"] == ["background", "aeroplane", "bicycle", "bird"]
    assert card["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert card["checkpoint"]["choice"].startswith("best on val")
    assert card["pseudo_labels"]["miou"] == pytest.approx(_pseudo_label_miou(root), abs=1e-9)
    assert card["config"]["test"]["card_inference"] == ["single", "msc+flip"]
    assert card["runs"][-1]["tool"] == "main.py --test" and card["runs"][-1]["hardware"]["cores"] == os.cpu_count()

    # test.py adds its rows and keeps main.py's: without CRF its number is the test pass's.
    _test_py("--logits_dir", str(run / "logits"), "--mode", "val", "--n-jobs", "1")
    _test_py("--logits_dir", str(run / "logits"), "--mode", "val", "--n-jobs", "1", "--crf")
    card = json.loads((run / "results.json").read_text())
    crf = json.loads((run / "val_pred_crf_scores.json").read_text())["miou"]
    assert card["rows"]["mean|single|crf|original"]["miou"] == crf
    assert card["rows"]["mean|single|no_crf|original"]["source"] == "test.py"
    assert card["rows"]["mean|single|no_crf|original"]["miou"] == pytest.approx(expected[("mean", "single")], abs=1e-9)
    assert card["rows"]["net2|msc+flip|no_crf|original"]["miou"] == pytest.approx(expected[("net2", "msc+flip")],
                                                                                 abs=1e-9)
    md = (run / "results.md").read_text()
    assert f"| both averaged | {100 * expected[('mean', 'single')]:.1f} | {100 * crf:.1f} |" in md
    assert "| bicycle |" in md and "—" in md  # per-class table; multi-scale + CRF not measured

    # Another checkpoint in the same folder: a new card, the old one kept beside it.
    other = tmp_path / "latest_ckpt.pth"
    ckpt_io.save_best(other, eval_nets(_cfg(root), 5))
    _main([a if a != str(ckpt) else str(other) for a in base] + ["--overwrite"])
    new = json.loads((run / "results.json").read_text())
    old = json.loads((run / "results.1.json").read_text())
    assert new["checkpoint"]["name"] == "latest_ckpt.pth" and new["checkpoint"]["choice"].startswith("last")
    assert "mean|single|crf|original" not in new["rows"] and old["rows"]["mean|single|crf|original"]["miou"] == crf
    assert (run / "results.1.md").is_file()

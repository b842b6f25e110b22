"""The mask study's sweep without training (the train function returns made-up mIoUs): its
aggregation arithmetic, resume, refusal of masks made with other settings, and the map (issue 26)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR, save_mask
from datasets.synthetic.mask_control import mask_figures
from tests.conftest import REPO
from tests.datasets.test_mask_control import noisy_set
from tools import mask_study
from utils.errors import DataError, OutputExistsError
from utils.io import save_png


@pytest.fixture
def first_stage(tmp_path):
    """An export folder (labels and own masks) and its ground truths."""
    labels, gts = noisy_set()
    ids = [f"img{i}" for i in range(len(labels))]
    export = tmp_path / "export"
    for item_id, label in zip(ids, labels):
        save_png(export / PSEUDO_LABEL_DIR / f"{item_id}.png", label)
        save_mask(export / MASK_DIR / f"{item_id}.png", np.indices(label.shape).sum(0) % 2)
    return export, ids, gts


def small_study(tmp_path, **changes):
    study = mask_study.load_study(REPO / "configs" / "mask_study.yaml")
    study.update(out=str(tmp_path / "out"), grid={"kept_precision": [0.95, 0.99], "dropped_precision": [0.75]},
                 shapes=["random", "boundary"], seeds=[0, 1, 2],
                 points=[{"name": "user", "kept_precision": 0.97, "dropped_precision": 0.8}])
    study.update(changes)
    return study


def fake_trainer(monkeypatch):
    """Made-up mIoUs: baseline 0.60/0.62/0.64 by seed; BECO on kept precision 0.99 cells 3, 4 and
    5 points above it (interval excludes 0), elsewhere -1, +1, -3 (it does not)."""
    calls = []

    def train_run(study, method, kind, seed, out, label_dir, mask_dir):
        calls.append((kind, method, seed))
        assert label_dir.name == PSEUDO_LABEL_DIR and mask_dir.is_dir()
        base = 0.60 + 0.02 * seed
        if method == "baseline":
            return base
        if method == "beco":
            return base + ((0.03, 0.04, 0.05) if "kp0.99" in kind else (-0.01, 0.01, -0.03))[seed]
        return base - 0.05
    monkeypatch.setattr(mask_study, "train_run", train_run)
    return calls


def test_aggregation_pairs_by_seed_with_the_t_interval():
    baseline = {0: 0.60, 1: 0.62, 2: 0.64}
    results = {"c": {"beco": {0: 0.63, 1: 0.66, 2: 0.69}, "other": {0: 0.59, 1: 0.63, 2: 0.61}}}
    table = mask_study.aggregate(baseline, results)
    beco = table["c"]["beco"]
    # Per-seed gains 0.03, 0.04, 0.05: mean 0.04, sample std 0.01, t(2) = 4.303.
    half = 4.303 * 0.01 / math.sqrt(3)
    assert beco["mean"] == pytest.approx(0.66) and beco["std"] == pytest.approx(0.03)
    assert beco["gain_mean"] == pytest.approx(0.04) and beco["gain_std"] == pytest.approx(0.01)
    assert beco["gain_ci95"] == pytest.approx([0.04 - half, 0.04 + half]) and beco["gain_wins"] == 3
    assert beco["excludes_zero"] is True
    # Gains -0.01, +0.01, -0.03: mean -0.01, std 0.02; the interval (±0.0497) holds 0.
    other = table["c"]["other"]
    assert other["gain_mean"] == pytest.approx(-0.01) and other["gain_std"] == pytest.approx(0.02)
    assert other["excludes_zero"] is False and other["gain_wins"] == 1
    # One seed: no interval, nothing marked.
    one = mask_study.aggregate({0: 0.6}, {"c": {"beco": {0: 0.7}}})["c"]["beco"]
    assert one["gain_ci95"] is None and one["excludes_zero"] is False


def test_sweep_reports_resumes_and_refuses_other_masks(tmp_path, monkeypatch, first_stage):
    export, ids, gts = first_stage
    study = small_study(tmp_path)
    out = tmp_path / "out"
    calls = fake_trainer(monkeypatch)
    md = mask_study.run_study(study, export, out, ids, gts)
    # 3 baselines + 4 cells x 3 methods x 3 seeds.
    assert len(calls) == 3 + 4 * 3 * 3 and sum(c[1] == "baseline" for c in calls) == 3
    data = json.loads((out / "mask_study.json").read_text())
    cell = data["table"]["boundary-kp0.99-dp0.75"]["beco"]
    assert cell["gain_mean"] == pytest.approx(0.04) and cell["excludes_zero"] is True
    assert data["table"]["random-kp0.95-dp0.75"]["beco"]["excludes_zero"] is False
    text = md.read_text()
    assert "| boundary-kp0.99-dp0.75 |" in text and "(+4.0 [+1.5, +6.5]) *" in text
    assert "first stage's own masks" in text
    assert (out / "gain_map.png").stat().st_size > 10_000
    # The masks on disk reach what the table says, and the own mask's figures are measured.
    figures = data["mask_figures"]["boundary-kp0.99-dp0.75"]
    assert abs(figures["kept_precision"] - 0.99) <= 1 / figures["kept_valid"]
    labels, own = mask_study.read_set(export, ids)
    assert data["own_mask"] == mask_figures(labels, own, gts)
    # Resume: a second call trains nothing and writes the same table.
    calls.clear()
    assert mask_study.run_study(study, export, out, ids, gts).read_text() == text and calls == []
    # Masks made with another seed are refused, before anything is trained or written.
    with pytest.raises(OutputExistsError, match=r"settings\.mask_seed: 0 -> 1"):
        mask_study.run_study({**study, "mask_seed": 1}, export, out, ids, gts)
    assert calls == []


def test_unreachable_cell_stops_before_any_mask(tmp_path, monkeypatch, first_stage):
    export, ids, gts = first_stage
    study = small_study(tmp_path, grid={"kept_precision": [0.95], "dropped_precision": [0.75, 0.999]})
    calls = fake_trainer(monkeypatch)
    with pytest.raises(DataError, match=r"grid cell random-kp0.95-dp0.999: kept precision 0.95 and dropped "
                                        r"precision 0.999 are unreachable"):
        mask_study.run_study(study, export, tmp_path / "out", ids, gts)
    assert not (tmp_path / "out" / "masks").exists() and calls == []


def test_runs_bound_to_their_masks(tmp_path, monkeypatch, first_stage):
    """A cell's masks remade otherwise (their record changed) make its runs refused."""
    export, ids, gts = first_stage
    study = small_study(tmp_path, shapes=["random"], seeds=[0],
                        grid={"kept_precision": [0.95], "dropped_precision": [0.75]})
    out = tmp_path / "out"
    fake_trainer(monkeypatch)
    mask_study.run_study(study, export, out, ids, gts)
    record_path = out / "masks" / "random-kp0.95-dp0.75" / "_provenance.json"
    record = json.loads(record_path.read_text())
    record["settings"]["mask_seed"] = 5
    record_path.write_text(json.dumps(record))
    with pytest.raises(OutputExistsError, match=r"inputs\.masks\.record"):
        mask_study.run_study({**study, "mask_seed": 5}, export, out, ids, gts)

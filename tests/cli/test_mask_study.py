"""The mask study's sweep without training (the train function returns made-up mIoUs): its
aggregation arithmetic, resume, refusal of labels and masks made with other settings, and the map (issue 26)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR, save_mask
from datasets.label_import import QUALITY_JSON, Source
from datasets.synthetic.mask_control import mask_figures
from tests.conftest import REPO
from tests.datasets.test_label_import import K, run_import
from tests.datasets.test_mask_control import noisy_set
from tools import mask_study
from utils.errors import ConfigError, DataError, OutputExistsError
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
    # With overwrite the masks are made again and their runs trained again; the baseline's stay.
    mask_study.run_study({**study, "mask_seed": 1}, export, out, ids, gts, overwrite=True)
    assert len(calls) == 4 * 3 * 3 and not any(c[1] == "baseline" for c in calls)
    assert json.loads((out / "masks" / "random-kp0.95-dp0.75" / "_provenance.json").read_text())[
        "settings"]["mask_seed"] == 1
    calls.clear()
    mask_study.run_study({**study, "mask_seed": 1}, export, out, ids, gts, overwrite=True)
    assert calls == []  # nothing changed since: nothing made again


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


def test_labels_made_otherwise_are_refused_before_anything_is_trained(tmp_path, monkeypatch, first_stage):
    """The first stage's labels changed under a finished study: its masks and runs are bound to the
    old ones, so the study stops naming the labels, and trains and writes nothing."""
    export, ids, gts = first_stage
    study = small_study(tmp_path, shapes=["random"], seeds=[0],
                        grid={"kept_precision": [0.95], "dropped_precision": [0.75]})
    out = tmp_path / "out"
    calls = fake_trainer(monkeypatch)
    mask_study.run_study(study, export, out, ids, gts)
    table = (out / "mask_study.md").read_bytes()
    masks = {p: p.read_bytes() for p in (out / "masks").rglob("*.png")}
    labels, _ = mask_study.read_set(export, ids)
    assert labels[0].any()
    # All background: another first stage's labels.
    save_png(export / PSEUDO_LABEL_DIR / f"{ids[0]}.png", np.zeros_like(labels[0]))
    calls.clear()
    with pytest.raises(OutputExistsError, match=r"first_stage_labels"):
        mask_study.run_study(study, export, out, ids, gts)
    assert calls == []
    assert (out / "mask_study.md").read_bytes() == table
    assert {p: p.read_bytes() for p in (out / "masks").rglob("*.png")} == masks


def study_file(tmp_path, **changes) -> Path:
    """configs/mask_study.yaml with some keys changed, as a file for load_study."""
    text = (REPO / "configs" / "mask_study.yaml").read_text()
    data = yaml.safe_load(text)
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_users_import_report_and_other_first_stages_are_placed_at_their_figures(
        synthetic_set, tmp_path, monkeypatch, first_stage):
    """A label set imported with ground truth on its ids is placed at the import report's kept and
    dropped precision; the first stage's own masks on another data set at the figures given."""
    root = synthetic_set("voc", train=6, val=2, test=0, size=(40, 48), classes=K, seed=4)
    run_import(root, tmp_path / "import", Source("ours", root / PSEUDO_LABEL_DIR, masks=root / MASK_DIR))
    quality = json.loads((tmp_path / "import" / "labels" / QUALITY_JSON).read_text())
    path = study_file(tmp_path, points=[{"name": "my labels", "label_quality": str(tmp_path / "import" / "labels")},
                                        {"name": "given", "kept_precision": 0.97, "dropped_precision": 0.8}])
    points = mask_study.load_study(path)["points"]
    assert points[0] == {"name": "my labels", "kept_share": quality["kept_share"],
                         "kept_precision": quality["kept_precision"], "dropped_precision": quality["dropped_precision"],
                         "source": str((tmp_path / "import" / "labels" / QUALITY_JSON).resolve())}
    assert points[1] == {"name": "given", "kept_share": None, "kept_precision": 0.97, "dropped_precision": 0.8}

    export, ids, gts = first_stage
    study = small_study(tmp_path, points=points, seeds=[0], shapes=["random"])
    fake_trainer(monkeypatch)
    coco = {"name": "first stage's own, coco", "kept_share": 0.5, "kept_precision": 0.9, "dropped_precision": 0.7}
    text = mask_study.run_study(study, export, tmp_path / "out", ids, gts, others=[coco]).read_text()
    assert ("| first stage's own, coco (placed, not trained here) | 0.500 | 0.900 | 0.700 |" in text)
    assert (f"| my labels (placed, not trained here) | {quality['kept_share']:.3f} | "
            f"{quality['kept_precision']:.3f} | {quality['dropped_precision']:.3f} |") in text
    assert "| given (placed, not trained here) | — | 0.970 | 0.800 |" in text
    assert json.loads((tmp_path / "out" / "mask_study.json").read_text())["placed"] == [coco] + points


def test_points_without_figures_are_refused_naming_the_point_and_file(synthetic_set, tmp_path):
    with pytest.raises(ConfigError, match=r"points\[0\] \('mine'\) lacks \['dropped_precision'\]"):
        mask_study.load_study(study_file(tmp_path, points=[{"name": "mine", "kept_precision": 0.9}]))
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"points\[0\]: no import report at {missing}/{QUALITY_JSON}"):
        mask_study.load_study(study_file(tmp_path, points=[{"name": "mine", "label_quality": str(missing / QUALITY_JSON)}]))
    # An import without ground truth has no precision to place.
    root = synthetic_set("voc", train=6, val=2, test=0, size=(40, 48), classes=K, seed=4)
    bare = tmp_path / "bare"
    shutil.copytree(root / "VOC2012", bare / "VOC2012")
    shutil.rmtree(bare / "VOC2012/SegmentationClass")
    run_import(bare, tmp_path / "import", Source("labels", root / PSEUDO_LABEL_DIR, rule="all"))
    report = tmp_path / "import" / "labels" / QUALITY_JSON
    with pytest.raises(ConfigError, match=rf"{report} has no kept or dropped precision"):
        mask_study.load_study(study_file(tmp_path, points=[{"name": "mine", "label_quality": str(report)}]))
    with pytest.raises(ConfigError, match=r"other_first_stages\.coco must give base_config and first_stage_config"):
        mask_study.load_study(study_file(tmp_path, other_first_stages={"coco": {"base_config": "x.yaml"}}))


def test_parts_share_the_cores_unless_the_user_set_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(mask_study.os, "cpu_count", lambda: 2)
    mask_study.share_cores(1)
    assert "OMP_NUM_THREADS" not in mask_study.os.environ
    mask_study.share_cores(2)
    assert mask_study.os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    mask_study.share_cores(2)
    assert mask_study.os.environ["OMP_NUM_THREADS"] == "3"

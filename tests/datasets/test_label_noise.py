"""The label-noise study's generators hit their error rate and their error type, and its seed
arithmetic is right (issue 15)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from datasets.synthetic.label_noise import boundary_errors, error_rate, fill_void, region_errors
from datasets.synthetic.voc import near_boundary
from tests.conftest import REPO


def scenes(n: int = 12, h: int = 64, w: int = 80, seed: int = 0) -> list[np.ndarray]:
    """Ground truths of one to three discs of classes 1..5 on background, each with a 2 px void outline."""
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        gt = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(12, h - 12), rng.uniform(12, w - 12), rng.uniform(7, 14)
            d = np.sqrt((gy - cy) ** 2 + (gx - cx) ** 2)
            gt[d < r] = int(rng.integers(1, 6))
            gt[(d >= r - 1) & (d < r + 1)] = 255
        out.append(gt)
    return out


def test_fill_void_takes_the_nearest_class():
    gt = np.array([[1, 255, 255, 2]], np.uint8)
    assert fill_void(gt).tolist() == [[1, 1, 2, 2]]
    assert (fill_void(np.full((2, 2), 255, np.uint8)) == 0).all()


@pytest.mark.parametrize("target", [0.02, 0.05])
def test_boundary_errors_hit_the_rate_within_the_band(target):
    gts = scenes()
    band = 5.0
    labels, rate = boundary_errors(gts, target, band, cell=10.0, seed=1)
    assert abs(rate - target) <= 0.002 and abs(error_rate(labels, gts) - rate) < 1e-12
    for label, gt in zip(labels, gts):
        wrong = (label != gt) & (gt != 255)
        assert not (wrong & ~near_boundary(gt, band)).any()      # never beyond the band
        assert 255 not in label


def test_boundary_errors_report_what_the_band_allows():
    gts = scenes(4)
    labels, rate = boundary_errors(gts, 0.9, 2.0, cell=10.0, seed=0)
    assert rate < 0.9 and rate == pytest.approx(error_rate(labels, gts))


@pytest.mark.parametrize("target", [0.03, 0.08])
def test_region_errors_hit_the_rate_beyond_the_band(target):
    gts = scenes(seed=2)
    band = 4.0
    labels, rate, counts = region_errors(gts, target, band, num_classes=6, seed=3)
    assert target <= rate < target + 0.03                        # reached; one error past it at most
    assert rate == pytest.approx(error_rate(labels, gts))
    assert sum(counts.values()) > 0 and set(counts) == {"false_blob", "missed_object", "class_swap"}
    for label, gt in zip(labels, gts):
        wrong = (label != gt) & (gt != 255)
        assert not (wrong & near_boundary(gt, band)).any()       # never within the band


def _study():
    spec = importlib.util.spec_from_file_location("noise_study", REPO / "tools" / "noise_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_seed_aggregation_pairs_by_seed():
    study = _study()
    results = {"boundary": {"baseline": {0: 0.60, 1: 0.70, 2: 0.65},
                            "beco": {0: 0.62, 1: 0.71, 2: 0.69}}}
    cell = study.summarise(results)["boundary"]
    assert cell["baseline"]["mean"] == pytest.approx(0.65) and cell["baseline"]["std"] == pytest.approx(0.05)
    assert "gain_mean" not in cell["baseline"]
    # Per-seed gains 0.02, 0.01, 0.04: mean 0.0233, sample std 0.01528.
    assert cell["beco"]["gain_mean"] == pytest.approx(0.07 / 3)
    assert cell["beco"]["gain_std"] == pytest.approx(math.sqrt(((0.02 - 0.07 / 3) ** 2 + (0.01 - 0.07 / 3) ** 2
                                                                + (0.04 - 0.07 / 3) ** 2) / 2))
    half = 4.303 * cell["beco"]["gain_std"] / math.sqrt(3)  # Student's t, 2 degrees of freedom
    assert cell["beco"]["gain_wins"] == 3 and cell["beco"]["gain_ci95"] == pytest.approx([0.07 / 3 - half, 0.07 / 3 + half])
    assert study.mean_std([0.5]) == (0.5, 0.0)


def test_label_sets_made_with_other_settings_are_refused(tmp_path):
    """Runs trained on one label set must never be reported beside labels made differently."""
    study = _study()
    settings = {k: 1 for k in study.LABEL_KEYS}
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "stats.json").write_text(json.dumps({"_settings": settings, "boundary": {}}))
    assert study.make_label_sets({**settings, "error_types": ["boundary"]}, None, tmp_path, tmp_path) == {"boundary": {}}
    # The study's folder now holds a record (utils/provenance.py), adopted from the old "_settings".
    assert json.loads((tmp_path / "labels" / "_provenance.json").read_text())["settings"] == settings
    from utils.errors import OutputExistsError
    with pytest.raises(OutputExistsError, match=r"settings\.band: 1 -> 6\.0"):
        study.make_label_sets({**settings, "band": 6.0, "error_types": ["boundary"]}, None, tmp_path, tmp_path)
    # Runs trained on the labels are bound to them: labels remade otherwise make the runs refused.
    record = json.loads((tmp_path / "labels" / "_provenance.json").read_text())
    record["settings"]["band"] = 6.0
    (tmp_path / "labels" / "_provenance.json").write_text(json.dumps(record))
    (tmp_path / "runs" / "boundary-beco-seed0").mkdir()
    with pytest.raises(OutputExistsError, match=r"inputs\.labels\.record"):
        study.make_label_sets({**settings, "band": 6.0, "error_types": ["boundary"]}, None, tmp_path, tmp_path)

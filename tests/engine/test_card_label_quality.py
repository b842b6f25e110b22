"""The results card links the quality report an import wrote beside the run's pseudo-labels
(engine/results_card.py, issue 25), and says nothing of one where there is none."""
from __future__ import annotations

import json
from pathlib import Path

from engine import results_card as card

SCORES = {"miou": 0.5, "pixel_acc": 0.8, "mean_acc": 0.6, "mean_precision": 0.55, "iou": [0.6, 0.4]}
CHECKPOINT = {"name": "best_ckpt.pth", "path": "/runs/r/best_ckpt.pth", "choice": "as given (--ckpt)",
              "sha256": "ab" * 32}


def _write(run_dir: Path, data: dict) -> dict:
    row = card.make_row(SCORES, "net1", "single", False, "original", split="val", num_images=2, source="test")
    card.update_card(run_dir, CHECKPOINT, [row], class_names=["background", "cat"],
                     config={"data": data, "model": {"name": "m"}, "method": {"name": "baseline"}},
                     tool="test.py", seconds=1.0)
    return json.loads((run_dir / card.CARD_JSON).read_text())


def _line(run_dir: Path) -> list[str]:
    return [x for x in (run_dir / card.CARD_MD).read_text().splitlines() if x.startswith("- Pseudo-labels:")]


def test_the_card_links_the_label_quality_report(tmp_path):
    root = tmp_path / "data"
    labels = root / "clip_labels"
    labels.mkdir(parents=True)
    (labels / "label_quality.md").write_text("# Label quality\n")
    (labels / "label_quality.json").write_text(json.dumps({"miou": 0.7312, "kept_share": 0.625, "per_class": {}}))
    run = tmp_path / "run"
    run.mkdir()
    saved = _write(run, {"root": str(root), "pseudo_label_dir": "clip_labels", "dataset": "voc"})
    report = str((labels / "label_quality.md").resolve())
    assert saved["label_quality"] == {"report": report, "miou": 0.7312, "kept_share": 0.625}
    assert _line(run) == [f"- Pseudo-labels: `{report}` (mIoU 73.1 %, kept share 62.5 %)"]
    # An absolute data.pseudo_label_dir stands alone; a json without the numbers shows dashes.
    (labels / "label_quality.json").write_text(json.dumps({"kept_share": "n/a"}))
    _write(run, {"root": str(tmp_path / "elsewhere"), "pseudo_label_dir": str(labels), "dataset": "voc"})
    assert _line(run) == [f"- Pseudo-labels: `{report}` (mIoU —, kept share —)"]


def test_no_report_no_line(tmp_path):
    root = tmp_path / "data"
    (root / "irn_pseudo_label").mkdir(parents=True)
    (root / "irn_pseudo_label" / "label_quality.json").write_text("{}")  # the md is what is linked
    run = tmp_path / "run"
    run.mkdir()
    saved = _write(run, {"root": str(root), "pseudo_label_dir": "irn_pseudo_label", "dataset": "voc"})
    assert "label_quality" not in saved and _line(run) == []

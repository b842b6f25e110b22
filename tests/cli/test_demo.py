"""Smoke test of `make demo` (tools/demo.py) at a tiny size: every stage runs for real, the
report's numbers come from the run, a rerun skips finished work, and a different seed in the
same folder is refused."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tools" / "demo.py"


def _configs(tmp: Path) -> list[str]:
    """Tiny versions of the three demo configs, inheriting everything else from them."""
    beco = tmp / "beco.yaml"
    beco.write_text(f"""_base_: {REPO / 'configs/demo.yaml'}
data:
  root: {tmp / 'data'}
  synthetic: {{train: 8, val: 3, test: 1, size: [48, 64], classes: 3, seed: 5, colours: class,
              colour_jitter: 25.0, object_scale: [0.22, 0.4], max_objects: 3}}
  num_classes: 4
  crop_size: 48
  val_size: 48
  batch_size: 4
  num_workers: 0
train:
  epochs: 2
  num_vis: 1
""")
    base = tmp / "baseline.yaml"
    base.write_text(f"""_base_: {beco}
method: {{name: baseline, co_training: false, mixing: false, strong_aug: {{enabled: false}}}}
""")
    first = tmp / "first_stage.yaml"
    first.write_text(f"""_base_: {REPO / 'configs/first_stage/demo.yaml'}
cam_crop_size: 48
cam_resize_long: [40, 64]
cam_batch_size: 4
cam_num_epoches: 1
cam_scales: [1.0, 0.5]
irn_crop_size: 48
irn_batch_size: 4
irn_num_epoches: 1
num_workers: 0
no_progress: true
""")
    return ["--beco-config", str(beco), "--baseline-config", str(base), "--first-stage-config", str(first)]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=400, cwd=REPO)


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "out"
    args = _configs(tmp_path) + ["--out", str(out), "--seed", "7", "--samples", "2"]
    r = _run(args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in ("data", "first_stage", "train_beco", "train_baseline", "test", "report"):
        assert f"stage {stage} done" in r.stdout

    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == res["first_stage_seed"] == res["second_stage_seed"] == 7
    fs = res["first_stage"]
    for key in ("cam_miou", "pseudo_label_miou", "mask_kept_precision"):
        assert 0.0 <= fs[key] <= 1.0
    assert 0.4 < fs["mask_kept_fraction"] <= 0.5  # gen_mask keeps floor(n_c / 2) of every class region
    for tag in ("beco", "baseline"):
        assert 0.0 <= res[tag]["no_crf"] <= 1.0 and 0.0 <= res[tag]["crf"] <= 1.0
        assert [r["epoch"] for r in res[tag]["val_log"]] == [1, 2]
        # The report's numbers are the stages' own outputs, not typed in.
        scores = json.loads((out / tag / "val_pred_scores.json").read_text())
        assert res[tag]["no_crf"] == scores["miou"]
    summary = json.loads((out / "first_stage" / "summary.json").read_text())
    assert fs["pseudo_label_miou"] == summary["steps"]["eval_sem_seg"]["metrics"]["sem_seg_miou"]
    sweep = summary["steps"]["eval_cam"]["metrics"]["cam_miou_sweep"]
    assert fs["cam_best_miou"] == max(sweep.values()) and sweep[f"{fs['cam_best_thres']:g}"] == fs["cam_best_miou"]
    assert summary["config"]["seed"] == 7
    for tag in ("beco", "baseline"):
        assert yaml.safe_load((out / tag / "config.yaml").read_text())["train"]["seed"] == 7

    md = (out / "results.md").read_text()
    assert f"{100 * res['beco']['no_crf']:.1f}" in md and f"{100 * fs['cam_miou']:.1f}" in md
    assert f"best threshold {fs['cam_best_thres']} (picked with the ground truth) | {100 * fs['cam_best_miou']:.1f} |" in md
    assert set(res["timings"]) == {"data", "first_stage", "train_beco", "train_baseline", "test", "report"}
    assert all(re.search(rf"\| {s} \| \d+\.\d \|", md) for s in res["timings"])

    samples = Image.open(out / "samples.png")
    assert samples.mode == "RGB" and samples.width > 6 * 64 and samples.height > 2 * 48
    assert Image.open(out / "curves.png").size[0] > 300
    # The pseudo-label column holds the exported first-stage labels, in the VOC palette.
    assert (out / "pseudo_labels" / "irn_pseudo_label").is_dir()
    assert np.asarray(Image.open(out / "samples.png")).std() > 10

    # Rerun: trainings are complete and skipped, the first stage redoes nothing.
    again = _run(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("data", "first_stage", "train_beco", "train_baseline", "test"):
        assert f"stage {stage}: already done, skipped" in again.stdout
    assert "stage report done" in again.stdout
    assert json.loads((out / "timings.json").read_text())["first_stage"] == res["timings"]["first_stage"]

    # Stages done but not timed here (the shared data set after --fresh, a lost timings.json)
    # count the time it took to find them done, so the report's table stays complete.
    (out / "timings.json").unlink()
    third = _run(args)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "stage data: already done, reused (no recorded time" in third.stdout
    assert set(json.loads((out / "timings.json").read_text())) == set(res["timings"])

    # Another seed into the same folder would mix two runs: refused with the file named.
    other = _run(_configs(tmp_path) + ["--out", str(out), "--seed", "8"])
    assert other.returncode == 1 and "_provenance.json" in other.stderr and "settings.seed: 7 -> 8" in other.stderr


def test_demo_dataset_coco_picks_the_coco_configs_and_folder():
    from tools import demo
    args = demo.parse_args(["--dataset", "coco"])
    assert args.beco_config.name == "demo_coco.yaml" and args.baseline_config.name == "demo_coco_baseline.yaml"
    assert args.first_stage_config == REPO / "configs/first_stage/demo_coco.yaml"
    assert args.out == Path("data/logging/demo_coco")
    assert demo.parse_args([]).out == Path("data/logging/demo")
    assert demo.FIRST_STAGE_DATA["coco"]("data/x") == ["--dataset", "coco", "--coco_root", Path("data/x")]
    for name in ("beco", "baseline"):  # both demo configs load and train on COCO's 81 classes
        cfg = demo.load_config(getattr(args, f"{name}_config"))
        assert cfg.data.dataset == "coco" and cfg.data.num_classes == 81


def _fake_seed(beco: float, base: float, pl: float, epochs=(1, 2)) -> dict:
    """A seed's results.json with only what --seeds aggregates."""
    log = [{"epoch": e, "miou": beco - 0.01 * (len(epochs) - e)} for e in epochs]
    return {"data": {"train": 8, "val": 3, "size": [48, 64], "classes": 3},
            "first_stage": {"cam_miou": 0.3, "pseudo_label_miou": pl, "mask_kept_fraction": 0.5},
            "beco": {"no_crf": beco, "crf": beco + 0.02, "best_during_training": beco, "card": {"net1": beco - 0.01},
                     "val_log": log},
            "baseline": {"no_crf": base, "crf": base + 0.01, "best_during_training": base,
                         "val_log": [{**r, "miou": r["miou"] - 0.05} for r in log]},
            "timings": {"first_stage": 10.0, "train_beco": 20.0, "report": 1.0}}


def test_seeds_aggregate_mean_std_and_paired_difference(tmp_path):
    from tools import demo
    from utils.seed_stats import T95
    per_seed = {0: _fake_seed(0.70, 0.66, 0.55), 1: _fake_seed(0.64, 0.65, 0.60), 2: _fake_seed(0.73, 0.67, 0.50)}
    agg = demo.aggregate(per_seed)
    pl = agg["numbers"]["pseudo-label mIoU, train list"]
    assert pl["mean"] == pytest.approx(0.55) and pl["std"] == pytest.approx(0.05)  # sample std (n - 1)
    assert "CAM mIoU at the sweep's best threshold" not in agg["numbers"]  # absent in every seed: no row
    d = agg["beco_minus_baseline"]["no CRF"]
    diffs = [0.04, -0.01, 0.06]
    assert d["values"] == pytest.approx(diffs) and d["mean"] == pytest.approx(0.03)
    sd = float(np.std(diffs, ddof=1))
    assert d["std"] == pytest.approx(sd) and d["wins"] == 2 and d["n"] == 3
    half = T95[1] * sd / np.sqrt(3)  # Student's t, 2 degrees of freedom
    assert d["ci95"] == pytest.approx([0.03 - half, 0.03 + half])
    assert agg["beco_minus_baseline"]["CRF"]["mean"] == pytest.approx(0.03 + 0.01)
    assert agg["seconds"] == {0: 31.0, 1: 31.0, 2: 31.0}

    md = demo.write_seeds_report(tmp_path, agg, per_seed).read_text()
    assert "| pseudo-label mIoU, train list | 55.0 ± 5.0 | 55.0 | 60.0 | 50.0 |" in md
    assert f"| no CRF | +3.0 ± {100 * sd:.1f} | [{100 * (0.03 - half):+.1f}, {100 * (0.03 + half):+.1f}] | 2 of 3 |" in md
    logs = {tag: [{r["epoch"]: r["miou"] for r in res[tag]["val_log"]} for res in per_seed.values()]
            for tag in ("beco", "baseline")}
    assert Image.open(demo.plot_curves(tmp_path, logs)).size[0] > 300


def test_seeds_option_is_checked():
    from tools import demo
    assert demo.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    for bad in (["--seeds", "1"], ["--seeds", "1,1"], ["--seeds", "a,b"], ["--seeds", "0,1", "--seed", "3"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)


def _demo_module():
    from tools import demo
    return demo


def test_fresh_never_deletes_a_folder_the_demo_did_not_make(tmp_path, capsys, monkeypatch):
    """Before: --fresh --out DIR deleted DIR, whatever it held, before anything was checked."""
    demo = _demo_module()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "results.md").write_text("chapter 3")  # a name the demo also writes, but not the demo's
    code = demo.main(_configs(tmp_path) + ["--out", str(out), "--fresh"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("demo: error: ") and "no _provenance.json" in err
    assert (out / "results.md").read_text() == "chapter 3"


def test_fresh_deletes_only_the_demos_outputs_and_only_after_the_configs_load(tmp_path):
    demo = _demo_module()
    out = tmp_path / "demo"
    args = demo.parse_args(_configs(tmp_path) + ["--out", str(out), "--seed", "7"])
    demo.prepare_out(args, {"seed": 7})
    for name in ("results.md", "notes.txt"):
        (out / name).write_text(name)
    (out / "beco").mkdir()
    # A broken config: refused before anything is deleted.
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: 2\n")
    bad = demo.parse_args(_configs(tmp_path) + ["--out", str(out), "--seed", "8", "--fresh", "--beco-config",
                                                str(broken)])
    with pytest.raises(Exception, match="not valid YAML"):
        demo.prepare_out(bad, {"seed": 8})
    assert (out / "results.md").is_file() and (out / "beco").is_dir()
    # Other settings without --fresh: refused naming the difference; with it, the demo's outputs go.
    other = demo.parse_args(_configs(tmp_path) + ["--out", str(out), "--seed", "8"])
    with pytest.raises(Exception, match=r"settings\.seed: 7 -> 8"):
        demo.prepare_out(other, {"seed": 8})
    other.fresh = True
    demo.prepare_out(other, {"seed": 8})
    assert sorted(p.name for p in out.iterdir()) == ["_provenance.json", "notes.txt"]

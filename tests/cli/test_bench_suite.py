"""benchmarks/run_all.py: its parsers of the benchmarks' printed lines, and one --smoke run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run_all

REPO = Path(__file__).resolve().parents[2]

# Lines as the benchmarks print them (taken from real runs).
TRAIN_LINE = ("device cpu beco deeplabv2 (11,287,128 parameters per net) size 128 batch 4 amp False: "
              "0.19 it/s 0.8 img/s")
TRAIN_LINE_CUDA = ("device cuda:0 baseline segformer (3,715,686 parameters per net) size 512 batch 4 amp True: "
                   "7.51 it/s 30.0 img/s peak_mem_gib 3.25")
OVERHEAD_OUT = """B = 4, 512 x 512, 21 classes, 2 threads, median of 3 (torch 2.14.1+cu130; photo-like images; train.keep_host_memory on)
  online labels (softmax + max)      0.031 s
  boundary-enhanced mixing           0.019 s
  strong augmentation                0.034 s
  total (as in the step)             0.091 s
"""
CRF_OUT = """4 inputs: synthetic 375x500 images, 21 classes (first 500x375, 21 classes) | 2 cores available | CRF 10 iterations, chunk 4
variant                  jobs  images/s  s/image  labels  same as full
full                        1      0.75     1.32    21.0  yes
full                        2      0.70     2.84    21.0  yes
pruned p>=0.001             1      1.96     0.51     2.5  yes
pruned p>=0.001             2      1.26     1.59     2.5  NO: 1 images, 12 pixels differ
s/image = core-seconds per image (wall time x jobs / images); labels = mean labels the CRF ran over
"""
RW_OUT = """torch 2.14.1+cu130, 2 CPU threads, beta 10, exp_times 8 (256 steps), radius 5
24x32 (n = 768): sparse 24.4 ms; dense running...
24x32: dense 1.526 s, sparse 0.0244 s, speedup 62.7x, max |score diff| 1.67e-05, labels equal True (0 of 12288 px differ)
48x64 (n = 3072): sparse 119.8 ms; dense running...
48x64: dense 65.456 s, sparse 0.1198 s, speedup 546.5x, max |score diff| 1.86e-05, labels equal False (3 of 49152 px differ)
speedup 546.5 max_abs_diff 1.860e-05 labels_equal false
"""
COCO_OUT = """3 synthetic COCO val images (first 732x556), 81 classes, maps 128x128; one core; extrapolated to val2014's 40,504 images
compact float16 maps keep 12.0 classes on average (max 12; on 0 images the cap dropped a class reaching the CRF's threshold); labels equal to dense float32 on 3/3 images without CRF (0 of 1,021,290 pixels differ), 3/3 with CRF (0 differ)

path                                                s/image  h, 1 core  h, 16 cores
save: dense float32                                   0.007        0.1         0.01
test.py no CRF: dense float32                         2.344       26.4         1.65
save: compact float16                                 0.021        0.2         0.01
test.py no CRF: compact float16                       0.040        0.5         0.03
test.py CRF pruned: dense float32                     1.246       14.0         0.88
test.py CRF pruned: compact float16                   0.693        7.8         0.49
test.py CRF over all 81 labels: dense float32         9.370      105.4         6.59

map format            MB/image  GB for val2014
dense float32            5.309           215.0
compact float16          0.427            17.3
"""


def test_train_step_parser():
    (figure, m), = run_all.parse_train_step("some warning\n" + TRAIN_LINE + "\n").values()
    assert (m["it_s"], m["img_s"], m["params_per_net"], m["model"], m["method"]) == (0.19, 0.8, 11287128, "deeplabv2",
                                                                                       "beco")
    assert "0.19 it/s" in figure and "peak_mem_gib" not in m
    m = run_all.parse_train_step(TRAIN_LINE_CUDA)[""][1]
    assert (m["it_s"], m["peak_mem_gib"], m["batch"], m["size"]) == (7.51, 3.25, 4, 512)
    with pytest.raises(ValueError):
        run_all.parse_train_step("Traceback (most recent call last):\n")


def test_step_overhead_parser_printed_lines_and_json():
    assert run_all.step_overhead_parts(OVERHEAD_OUT) == {"online": 0.031, "mixing": 0.019, "strong": 0.034,
                                                         "total": 0.091}
    # run_all's call prints main()'s returned dict as JSON after the lines: that wins.
    returned = {"online labels (softmax + max)": 0.0312, "boundary-enhanced mixing": 0.0191,
                "strong augmentation": 0.0345, "total (as in the step)": 0.0905}
    parts = run_all.step_overhead_parts(OVERHEAD_OUT + json.dumps(returned) + "\n")
    assert parts["total"] == 0.0905 and parts["mixing"] == 0.0191
    figure, metrics = run_all.parse_step_overhead(OVERHEAD_OUT)[""]
    assert metrics["total_s"] == 0.091 and "0.091" in figure
    with pytest.raises(ValueError, match="total"):
        run_all.step_overhead_parts(OVERHEAD_OUT.replace("  total (as in the step)             0.091 s\n", ""))


def test_crf_parser():
    rows = run_all.parse_crf(CRF_OUT, jobs_all=2)
    assert set(rows) == {"full.1core", "full.allcores", "pruned.1core", "pruned.allcores"}
    m = rows["pruned.1core"][1]
    assert (m["img_s"], m["core_s_per_image"], m["labels"], m["same_as_full"]) == (1.96, 0.51, 2.5, "yes")
    assert rows["pruned.allcores"][1]["same_as_full"].startswith("NO: 1 images")
    assert rows["full.allcores"][1]["wall_s_per_image"] == pytest.approx(1 / 0.70)
    # On one core, "all cores" is the one-core line.
    assert set(run_all.parse_crf(CRF_OUT, jobs_all=1)) == set(rows)


def test_random_walk_parser():
    rows = run_all.parse_random_walk(RW_OUT)
    assert set(rows) == {"24x32", "48x64"}
    m = rows["48x64"][1]
    assert (m["dense_s"], m["sparse_s"], m["speedup"], m["max_abs_diff"], m["labels_equal"]) == (
        65.456, 0.1198, 546.5, 1.86e-05, False)
    assert rows["24x32"][1]["labels_equal"] is True


def test_coco_eval_parser():
    rows = run_all.parse_coco_eval(COCO_OUT)
    assert set(rows) == {"save", "no_crf", "crf_pruned", "crf_full", "disk"}
    assert rows["no_crf"][1] == {"dense float32_s_per_image": 2.344, "compact float16_s_per_image": 0.040}
    assert rows["crf_full"][1] == {"dense float32_s_per_image": 9.370}
    assert rows["disk"][1] == {"dense float32_mb_per_image": 5.309, "compact float16_mb_per_image": 0.427}


def test_json_tail_parsers():
    out = "progress line\n" + json.dumps({"rows": [
        {"workers": 0, "img_s": 700.0, "img_s_per_worker": 700.0, "first_batch_s": 0.02},
        {"workers": 2, "img_s": 580.0, "img_s_per_worker": 290.0, "first_batch_s": 0.05}]}) + "\n"
    rows = run_all.parse_data_pipeline(out)
    assert set(rows) == {"w0", "w2"} and rows["w2"][1]["img_s_per_worker"] == 290.0
    out = json.dumps({"rows": [{"variant": "loading", "batch": 1, "img_s": 650.0},
                               {"variant": "msc_flip", "batch": 8, "img_s": 4.7}]})
    assert set(run_all.parse_eval_speed(out)) == {"loading", "msc_flip.b8"}
    with pytest.raises(ValueError):
        run_all.json_tail("no json here\n")


def test_machine_slug():
    assert run_all.machine_slug("Intel(R) Xeon(R) Processor", 2) == "cpu2-intel-xeon"
    assert run_all.machine_slug("Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz", 16) == "cpu16-intel-xeon-gold-6230"
    assert run_all.machine_slug("AMD EPYC 7B13 64-Core Processor", 8) == "cpu8-amd-epyc-7b13"


def test_failed_benchmark_becomes_error_rows(tmp_path):
    bench = run_all.Bench("boom", "S", ["-c", "import sys; sys.exit('broken on purpose')"], "python boom.py",
                          {"a": "first", "b": "second"}, run_all.parse_train_step)
    rows = run_all.run_bench(bench, timeout=60)
    assert [r.id for r in rows] == ["boom.a", "boom.b"]
    assert all(r.error == "exit 1: broken on purpose" for r in rows)
    bench = run_all.Bench("odd", "S", ["-c", "print('nothing to parse')"], "python odd.py", {"": "x"},
                          run_all.parse_train_step)
    assert run_all.run_bench(bench, timeout=60)[0].error.startswith("could not parse the output")


SMOKE_ROWS = [
    "train_step.deeplabv3plus", "train_step.deeplabv2", "train_step.segformer", "train_step.baseline",
    "step_overhead.photo", "step_overhead.noise",
    *(f"data_pipeline.{s}.w{w}" for s in ("demo", "voc") for w in (0, 1, 2)),
    "eval_speed.loading", *(f"eval_speed.{v}.b{b}" for b in (1, 2) for v in ("single", "msc_flip", "test_loop")),
    "crf.full.1core", "crf.full.allcores", "crf.pruned.1core", "crf.pruned.allcores",
    "random_walk.8x12",
    "coco_eval.save", "coco_eval.no_crf", "coco_eval.crf_pruned", "coco_eval.crf_full", "coco_eval.disk",
    "demo.voc", "demo.coco",
]


@pytest.mark.slow  # ~45 s on 2 quiet cores, minutes on a loaded machine: a dozen processes importing torch
def test_smoke_run_writes_every_row(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--smoke", "--out", str(tmp_path),
                           "--machine", "smoke"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md, js = tmp_path / "smoke.md", tmp_path / "smoke.json"
    assert md.is_file() and js.is_file()
    report = json.loads(js.read_text())
    for key in ("cpu", "cores", "torch", "commit", "date"):
        assert report[key] not in (None, ""), key
    rows = {r["id"]: r for r in report["rows"]}
    assert list(rows) == SMOKE_ROWS
    text = md.read_text()
    for row_id, row in rows.items():
        assert f"| {row_id} |" in text
        assert row["command"] and f"`{row['command'].replace('|', chr(92) + '|')}`" in text
        if row_id.startswith("demo."):
            assert row["error"] is None or row["error"].startswith("not run (run `make demo")
        else:
            assert row["error"] is None, (row_id, row["error"])
            assert row["figure"] and row["metrics"]

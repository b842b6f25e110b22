"""First stage: errors reported as main.py reports them, the preflight, images without class.

run_sample.py's command (``cli``) prints ``error: <one line>`` on stderr, writes the traceback
to ``<work_dir>/log.txt`` and exits 2 for option errors, 1 for data and run errors; any other
exception keeps its traceback. The preflight checks the data root and every id's image and
image-level labels before a step starts. Images without any class are reported (log, summary).
Tiny hand-made trees; no step here trains a network.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irn import run_sample
from datasets.verify import first_stage_preflight
from datasets.coco import COCO_CLASSES, stem_of
from datasets.prepare.cls_labels import LabelError, save_cls_labels
from utils.errors import ConfigError, DataError
from datasets.views import data_source

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"

TRAIN = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]
VAL = ["2008_000001", "2008_000002"]
NO_CLASS = "2007_000003"  # its annotation names no object
SIZE = (24, 32)
CLASS_OF = {"2007_000001": "cat", "2007_000002": "dog", "2007_000004": "person", "2008_000001": "cat",
            "2008_000002": "dog"}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield


def _xml(name: str | None) -> str:
    obj = f"<object><name>{name}</name><difficult>0</difficult></object>" if name else ""
    return f"<annotation><filename>x.jpg</filename>{obj}</annotation>"


def write_voc(root: Path) -> Path:
    """VOC2012 layout: JPEGImages, Annotations (one image without object), SegmentationClass, lists."""
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in TRAIN + VAL:
        Image.fromarray(rng.integers(0, 256, SIZE + (3,), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(_xml(CLASS_OF.get(i)))
        Image.fromarray(np.zeros(SIZE, np.uint8), mode="L").save(root / "SegmentationClass" / f"{i}.png")
    lists = root / "ImageSets/Segmentation"
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in TRAIN))
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in TRAIN[:2]))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VAL))
    return root


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "VOC2012")


def _argv(voc: Path, work: Path, *more: str) -> list[str]:
    return ["--voc12_root", str(voc), "--work_dir", str(work), "--device", "cpu", "--num_workers", "0",
            "--no_progress", "--backbone_depth", "18", *more]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = run_sample.cli(argv)
    return code, capsys.readouterr().err


def _command(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, str(IRN / "run_sample.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def _log(work: Path) -> str:
    return (work / "log.txt").read_text()


# ----------------------------------------------------------------------------- exit codes (the command)


def test_missing_root_is_a_data_error_naming_the_flag(tmp_path):
    root, work = tmp_path / "nowhere" / "VOC2012", tmp_path / "work"
    r = _command("--voc12_root", str(root), "--work_dir", str(work), "--steps", "train_cam", "--device", "cpu")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: data root not found: --voc12_root {root} (the VOC2012 folder: "
                                             "JPEGImages/, Annotations/, ImageSets/Segmentation/, SegmentationClass/)"]
    log = _log(work)
    assert f"error: data root not found: --voc12_root {root}" in log and "Traceback" in log  # traceback: log only
    assert "== train_cam" not in log


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    r = _command("--max_images", "0", "--work_dir", str(tmp_path / "w"))
    assert r.returncode == 2 and r.stderr.strip() == "error: --max_images must be >= 1, got 0"
    code, err = _cli(["--no_class_mask", "skip", "--work_dir", str(tmp_path / "w")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: --no_class_mask skip cannot be honoured: the second stage trains on every id "
                          "of its own list")
    with pytest.raises(SystemExit) as stop:  # argparse's own errors: 2 as well
        run_sample.cli(["--steps", "bogus"])
    assert stop.value.code == 2 and "unknown step(s) ['bogus']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--cpu_shards must be >= 1, got 0"):
        run_sample.main(["--cpu_shards", "0", "--work_dir", str(tmp_path / "w")])  # Python callers get the error
    with pytest.raises(ConfigError, match=r"--mask_thd must be in \(0, 1\], got 1.5"):
        run_sample.parse_args(["--mask_thd", "1.5", "--work_dir", str(tmp_path / "w")])
    with pytest.raises(ConfigError, match="--device 'tpu0' is not a device"):
        run_sample.parse_args(["--device", "tpu0", "--work_dir", str(tmp_path / "w")])


def test_a_programming_error_keeps_its_traceback(voc, tmp_path):
    work = tmp_path / "work"
    code = ("import sys; from irn import run_sample\n"
            "def broken(args):\n    raise TypeError('unsupported operand in a step')\n"
            "run_sample.step_runner = lambda name: broken\n"
            "sys.exit(run_sample.cli(sys.argv[2:]))")
    r = _command(str(IRN), *_argv(voc, work, "--steps", "eval_cam"), code=code)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "TypeError: unsupported operand in a step" in r.stderr
    assert "error: unsupported" not in r.stderr


def test_cli_raises_what_is_not_ours_and_reports_config_errors_of_a_step(voc, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"

    def broken(args):
        raise ValueError("a bare ValueError is a bug")
    monkeypatch.setattr(run_sample, "step_runner", lambda name: broken)
    with pytest.raises(ValueError, match="a bare ValueError is a bug"):
        run_sample.cli(_argv(voc, work, "--steps", "eval_cam"))
    monkeypatch.undo()
    # A config error found inside a step (more batch than images) is still 2.
    code, err = _cli(_argv(voc, work, "--steps", "train_cam", "--cam_batch_size", "16"), capsys)
    assert code == 2
    assert err.strip() == "error: train_cam: 4 training images < batch size 16; lower --cam_batch_size"
    assert "Traceback" in _log(work) and "lower --cam_batch_size" in _log(work)


# ----------------------------------------------------------------------------- preflight


def preflight(args, steps, log):
    """The first stage's preflight as run_sample.py runs it: through the run's data source."""
    return first_stage_preflight(args, data_source(args), steps, log)


def test_missing_annotation_is_found_before_training(voc, tmp_path, capsys):
    work = tmp_path / "work"
    (voc / "Annotations" / "2007_000002.xml").unlink()
    (voc / "Annotations" / "2007_000004.xml").unlink()
    code, err = _cli(_argv(voc, work, "--steps", "train_cam,make_cam"), capsys)
    assert code == 1
    lst, xml = voc / "ImageSets/Segmentation/train_aug.txt", voc / "Annotations" / "2007_000002.xml"
    assert err.strip() == (f"error: train list {lst}: annotation missing for id '2007_000002': {xml} "
                           "(2 of 4 ids have no usable image-level labels)")
    log = _log(work)
    assert "== train_cam" not in log and not (work / "sess" / "res18_cam.pth").exists()
    assert "Traceback" in log and "LabelDataError" in log


def test_malformed_annotation_names_id_and_file(voc, tmp_path, capsys):
    work = tmp_path / "work"
    bad = voc / "Annotations" / "2007_000004.xml"
    bad.write_text("<annotation><object><name>cat</name>")
    code, err = _cli(_argv(voc, work, "--steps", "make_cam"), capsys)
    assert code == 1
    assert err.startswith(f"error: train list {voc / 'ImageSets/Segmentation/train_aug.txt'}: annotation for id "
                          f"'2007_000004' is not valid XML: {bad} (")
    assert err.rstrip().endswith("(1 of 4 ids have no usable image-level labels)")
    assert "== make_cam" not in _log(work)


def test_val_list_and_images_are_checked_too(voc, tmp_path, capsys):
    work = tmp_path / "work"
    (voc / "Annotations" / "2008_000002.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    code, err = _cli(_argv(voc, work, "--steps", "train_cam"), capsys)
    assert code == 1 and err.startswith(f"error: val list {voc / 'ImageSets/Segmentation/val.txt'}: annotation for "
                                        "id '2008_000002' names unknown class 'unicorn'")
    # Without the validation loss the val list is not read.
    (voc / "JPEGImages" / "2007_000003.jpg").unlink()
    code, err = _cli(_argv(voc, work, "--steps", "train_cam", "--cam_val_loss", "false"), capsys)
    assert code == 1
    assert err.strip() == (f"error: train list {voc / 'ImageSets/Segmentation/train_aug.txt'}: image missing for id "
                           f"'2007_000003': {voc / 'JPEGImages' / '2007_000003.jpg'} (1 of 4 ids have no image)")


def test_cls_labels_file_spares_the_xml(voc, tmp_path):
    import logging
    save_cls_labels(voc / "cls_labels.json", {"2007_000001": [7], "2007_000002": [11], "2007_000003": [],
                                              "2007_000004": [14]})
    for i in TRAIN:
        (voc / "Annotations" / f"{i}.xml").unlink()
    args = run_sample.parse_args(_argv(voc, tmp_path / "work", "--cam_val_loss", "false"))
    report = preflight(args, ["make_cam"], logging.getLogger("test"))
    assert report["no_class_images"] == 1 and report["no_class_ids"] == [NO_CLASS]
    assert report["checked"]["train"] == {"list": str(voc / "ImageSets/Segmentation/train_aug.txt"), "ids": 4,
                                          "checked": ["images", "labels"]}


def write_coco(root: Path) -> Path:
    """tools/prepare_coco.py's layout with 3 train and 2 val images; train 42 has no class."""
    rng = np.random.default_rng(1)
    items = {"train": [(9, [0]), (25, [11]), (42, [])], "val": [(5, [0]), (17, [79])]}
    for split, rows in items.items():
        folder = f"{split}2014"
        for d in (root / folder, root / "mask" / folder, root / "lists"):
            d.mkdir(parents=True, exist_ok=True)
        for image_id, _ in rows:
            Image.fromarray(rng.integers(0, 256, SIZE + (3,), dtype=np.uint8)).save(
                root / folder / f"{stem_of(split, image_id)}.jpg")
            Image.fromarray(np.zeros(SIZE, np.uint8), mode="L").save(root / "mask" / folder / f"{image_id}.png")
        (root / "lists" / f"{folder}.txt").write_text("".join(f"{stem_of(split, i)}\n" for i, _ in rows))
        save_cls_labels(root / f"cls_labels_{folder}.json", {stem_of(split, i): c for i, c in rows}, COCO_CLASSES[1:])
    return root


def test_coco_root_and_labels(tmp_path, capsys):
    work = tmp_path / "work"
    base = ["--dataset", "coco", "--work_dir", str(work), "--device", "cpu", "--num_workers", "0", "--no_progress",
            "--steps", "make_cam"]
    code, err = _cli(base + ["--coco_root", str(tmp_path / "coco")], capsys)
    assert code == 1 and err.startswith(f"error: data root not found: --coco_root {tmp_path / 'coco'} (")
    root = write_coco(tmp_path / "coco")
    labels = json.loads((root / "cls_labels_train2014.json").read_text())
    del labels["labels"]["COCO_train2014_000000000025"]
    (root / "cls_labels_train2014.json").write_text(json.dumps(labels))
    code, err = _cli(base + ["--coco_root", str(root)], capsys)
    assert code == 1
    assert err.strip() == (f"error: train list {root / 'lists/train2014.txt'}: image-level labels missing for id "
                           f"'COCO_train2014_000000000025': {root / 'cls_labels_train2014.json'} "
                           "(1 of 3 ids have no usable image-level labels)")
    assert "== make_cam" not in _log(work)


def test_error_types_are_the_projects():
    from irn.misc.cam_io import CamFileError
    from utils.errors import DeviceError, MissingInputError, OptionError, WeightsError, spawned_error
    from irn.step.gen_mask import ScoreFileError
    from datasets.sources import LabelDataError
    assert issubclass(CamFileError, DataError) and issubclass(ScoreFileError, DataError)
    assert issubclass(LabelDataError, DataError) and issubclass(LabelDataError, LabelError)
    assert issubclass(OptionError, ConfigError) and OptionError.exit_code == 2 and DeviceError.exit_code == 2
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(WeightsError, RuntimeError)
    assert MissingInputError.exit_code == WeightsError.exit_code == 1
    # An error of ours raised in a spawned make_cam / make_sem_seg shard: its one line and code.
    from torch.multiprocessing import ProcessRaisedException
    tb = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
          "  File \"x.py\", line 1, in f\nirn.misc.cam_io.CamFileError: CAM file missing for id 'a': /w/a.npy\n")
    assert spawned_error(ProcessRaisedException(tb, 1, 99)) == (1, "CAM file missing for id 'a': /w/a.npy")
    assert spawned_error(ProcessRaisedException(tb.replace("irn.misc.cam_io.CamFileError", "KeyError"), 1, 99)) is None
    assert spawned_error(ValueError("x")) is None


# ----------------------------------------------------------------------------- images without class


def _seed_results(work: Path, ids: list[str]) -> None:
    """What make_sem_seg leaves: score files (background plane only for the image without class)
    and pseudo-labels."""
    from irn.step.make_sem_seg_labels import save_score
    h, w = SIZE
    for i in ids:
        if i == NO_CLASS:
            pred, score, keys = torch.zeros(h, w, dtype=torch.long), torch.full((1, h, w), 0.25), torch.tensor([0])
        else:
            score = torch.rand(2, h, w, generator=torch.Generator().manual_seed(len(i)))
            pred = score.argmax(0) * 8
            keys = torch.tensor([0, 8])
        save_score(work / "result" / "score" / f"{i}.pt", pred, score, keys)
        Image.fromarray(pred.numpy().astype(np.uint8), mode="L").save(work / "result" / "sem_seg" / f"{i}.png")


def test_no_class_images_are_reported_and_exported_visibly(voc, tmp_path, capsys):
    from irn.step.gen_mask import read_mask_png
    work, out = tmp_path / "work", tmp_path / "export"
    argv = _argv(voc, work, "--steps", "gen_mask,export", "--export_to", str(out))
    for d in ("score", "sem_seg"):
        (work / "result" / d).mkdir(parents=True)
    _seed_results(work, TRAIN)
    assert run_sample.cli(argv) == 0
    log = _log(work)
    half = ("their masks mark a seeded random half of their pixels reliable (--no_class_mask random_half)")
    assert (f"preflight: 1 image has no class: their pseudo-labels will be all background and {half}; "
            f"ids {NO_CLASS}") in log
    assert f"gen_mask: 1 image has no class: their pseudo-labels are all background and {half}" in log
    assert f"export: 1 image has no class: their pseudo-labels are all background and {half}; ids {NO_CLASS}" in log
    assert log.index("preflight: 1 image has no class") < log.index("== gen_mask")  # before work starts
    summary = json.loads((work / "summary.json").read_text())
    assert summary["preflight"]["no_class_images"] == 1 and summary["preflight"]["no_class_ids"] == [NO_CLASS]
    assert (work / "logs" / "no_class_ids.txt").read_text() == f"{NO_CLASS}\n"
    gen, exp = summary["steps"]["gen_mask"]["metrics"], summary["steps"]["export"]["metrics"]
    assert (gen["no_class_images"], gen["no_class_ids"], gen["no_class_mask"]) == (1, [NO_CLASS], "random_half")
    assert (exp["no_class_images"], exp["no_class_ids"], exp["no_class_mask"]) == (1, [NO_CLASS], "random_half")
    assert exp["irn_mask"] == exp["irn_pseudo_label"] == len(TRAIN)  # every id exported, the second stage lists it
    mask = read_mask_png(out / "irn_mask" / f"{NO_CLASS}.png")
    assert mask.shape == SIZE and int(mask.sum()) == SIZE[0] * SIZE[1] // 2
    assert int(np.asarray(Image.open(out / "irn_pseudo_label" / f"{NO_CLASS}.png")).max()) == 0

    # Another policy without --overwrite is refused before any step runs, naming the option (it
    # used to keep the old masks and record the new value beside them); nothing is rewritten.
    masks = {p.name: p.stat().st_mtime_ns for p in (out / "irn_mask").glob("*.png")}
    summary_before = (work / "summary.json").read_text()
    code, err = _cli(argv + ["--no_class_mask", "zero"], capsys)
    assert code == 1 and "settings.no_class_mask: 'random_half' -> 'zero'" in err and "--overwrite" in err
    assert str(work / "result" / "mask_irn" / "_provenance.json") in err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "irn_mask").glob("*.png")} == masks
    assert json.loads((work / "summary.json").read_text())["steps"] == json.loads(summary_before)["steps"]
    assert run_sample.cli(argv + ["--no_class_mask", "zero", "--overwrite"]) == 0
    assert steps_metrics(work)["export"]["no_class_mask"] == "zero"
    assert ("export: 1 image has no class: their pseudo-labels are all background and their masks mark no pixel "
            "reliable (--no_class_mask zero)") in _log(work)
    assert int(read_mask_png(out / "irn_mask" / f"{NO_CLASS}.png").sum()) == 0
    capsys.readouterr()


def steps_metrics(work: Path) -> dict:
    return {k: v["metrics"] for k, v in json.loads((work / "summary.json").read_text())["steps"].items()}


def test_no_class_count_before_training(voc, tmp_path):
    import logging
    args = run_sample.parse_args(_argv(voc, tmp_path / "work"))
    report = preflight(args, ["train_cam"], logging.getLogger("test"))
    assert (report["no_class_images"], report["no_class_ids"]) == (1, [NO_CLASS])
    assert set(report["checked"]) == {"train", "val"}
    # Steps that read no labels report nothing (gen_mask counts from the score files).
    assert "no_class_images" not in preflight(args, ["cam_to_ir_label"], logging.getLogger("test"))


def test_export_refuses_missing_outputs(voc, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "export"
    for d in ("score", "sem_seg"):
        (work / "result" / d).mkdir(parents=True)
    _seed_results(work, TRAIN)
    (work / "result" / "sem_seg" / "2007_000002.png").unlink()
    code, err = _cli(_argv(voc, work, "--steps", "export", "--export_to", str(out)), capsys)
    assert code == 1
    assert err.strip() == (f"error: export: 1 of 4 files missing in {work / 'result' / 'sem_seg'}, e.g. id "
                           f"'2007_000002': {work / 'result' / 'sem_seg' / '2007_000002.png'}")
    assert not (out / "irn_pseudo_label").exists()  # nothing half-exported


def test_gen_mask_summary_counts_without_the_driver(tmp_path):
    from irn.step.gen_mask import generate_masks
    from irn.step.make_sem_seg_labels import save_score
    save_score(tmp_path / "s" / "e.pt", torch.zeros(3, 4, dtype=torch.long), torch.full((1, 3, 4), 0.25),
               torch.tensor([0]))
    out = generate_masks(["e"], tmp_path / "s", tmp_path / "m", show_progress=False)
    assert out["no_class_images"] == 1 and out["no_class_ids"] == ["e"] and out["no_class_masks_of_other_policy"] == 0


def test_library_use_without_driver_still_works(voc):
    """A source opened without the driver's options (library use) reads labels as the steps do."""
    from datasets.views import open_source
    src = open_source("voc", voc)
    assert src.labels("2007_000001") == [7] and src.labels(NO_CLASS) == []
    assert src.check_labels(TRAIN) == [NO_CLASS]


def test_step_outputs_are_reused_only_for_the_options_and_upstream_that_made_them(voc, tmp_path):
    """The driver's provenance (utils/provenance.py): a step's folder records its options and the
    records of the steps it reads; before, --conf_fg_thres 0.9 found "8 already done"."""
    from utils import provenance
    from utils.errors import OutputExistsError
    work = tmp_path / "work"

    def plans(*more: str) -> dict:
        args = run_sample.parse_args(_argv(voc, work, "--steps", "make_cam,cam_to_ir_label", *more))
        return run_sample.plan_steps(args, args.steps)

    for plan in (p for ps in plans().values() for p in ps):
        provenance.commit(plan)
    (work / "result" / "ir_label" / "2007_000001.png").write_bytes(b"made")
    assert [p.action for ps in plans().values() for p in ps] == ["reuse", "reuse"]
    with pytest.raises(OutputExistsError, match=r"settings\.conf_fg_thres: 0\.3 -> 0\.9"):
        plans("--conf_fg_thres", "0.9")
    # CAMs made with other scales: the labels made from the old CAMs are stale too.
    with pytest.raises(OutputExistsError, match=r"settings\.cam_scales"):
        plans("--cam_scales", "1.0")
    args = run_sample.parse_args(_argv(voc, work, "--steps", "cam_to_ir_label", "--cam_scales", "1.0"))
    made = run_sample.step_records(args, ["make_cam", "cam_to_ir_label"])
    provenance.prepare(work / "result" / "cam", made["make_cam"], ("*.npy",), overwrite=True)
    with pytest.raises(OutputExistsError, match=r"inputs\.step:make_cam\.record"):
        run_sample.plan_steps(args, args.steps)
    assert (work / "result" / "ir_label" / "2007_000001.png").read_bytes() == b"made"
    # --overwrite replaces them, and only at the step's start.
    (plan,) = run_sample.plan_steps(run_sample.parse_args(_argv(voc, work, "--steps", "cam_to_ir_label",
                                                                "--cam_scales", "1.0", "--overwrite")),
                                    ["cam_to_ir_label"])["cam_to_ir_label"]
    assert plan.action == "replace" and (work / "result" / "ir_label" / "2007_000001.png").is_file()
    provenance.commit(plan)
    assert not (work / "result" / "ir_label" / "2007_000001.png").exists()


# ----------------------------------------------------------------------------- IRN crop and radius


def _ir_labels(work: Path) -> None:
    """What cam_to_ir_label leaves for the train list: background, class-8 and unknown seeds."""
    out = work / "result" / "ir_label"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in TRAIN:
        seeds = rng.choice(np.array([0, 8, 255], np.uint8), SIZE)
        Image.fromarray(seeds, mode="L").save(out / f"{i}.png")


def _train_irn(voc: Path, work: Path, crop: int, radius: int) -> list[str]:
    return _argv(voc, work, "--steps", "train_irn", "--irn_crop_size", str(crop), "--radius", str(radius),
                 "--irn_batch_size", "2", "--irn_num_epoches", "1")


def test_a_crop_too_small_for_the_radius_is_refused_before_any_step(voc, tmp_path, capsys):
    """It failed in train_irn, after train_cam, make_cam and cam_to_ir_label had run."""
    work = tmp_path / "work"
    small = ("--cam_crop_size", "32", "--cam_resize_long", "32,40", "--cam_batch_size", "2", "--cam_num_epoches", "1",
             "--cam_scales", "1.0", "--irn_batch_size", "2", "--irn_num_epoches", "1")
    code, err = _cli(_argv(voc, work, *small, "--irn_crop_size", "64"), capsys)  # --steps all, --radius 10
    assert code == 2 and err.strip().splitlines() == [
        "error: --irn_crop_size 64 is too small for --radius 10: IRN trains on the crop's stride-4 map (16x16), "
        "and paths of radius 10 need it at least 19 wide; use --irn_crop_size >= 75 or --radius <= 8"]
    assert not (work / "log.txt").exists() or "== train_cam" not in _log(work)
    assert not list((work / "sess").glob("*.pth")) if (work / "sess").exists() else True


@pytest.mark.parametrize("crop", [75, 78])
def test_the_smallest_accepted_crops_train(voc, tmp_path, crop):
    """At the boundary the check lets through, train_irn runs (74 is refused: its 18x18 map is one short)."""
    work = tmp_path / "work"
    _ir_labels(work)
    with pytest.warns(UserWarning, match="NO IMAGENET WEIGHTS"):
        res = run_sample.main(_train_irn(voc, work, crop, 10))
    assert res["train_irn"]["max_step"] == 2 and np.isfinite(res["train_irn"]["final_loss"])
    with pytest.raises(ConfigError, match=r"--irn_crop_size 74 is too small for --radius 10"):
        run_sample.parse_args(_train_irn(voc, work, 74, 10))


def test_a_crop_whose_network_and_label_maps_differ_is_refused(voc, tmp_path):
    """The network's stride-4 map is ceil(crop/4), the affinity labels' crop/4 rounded half to even:
    at 77 they differ and the first training step failed."""
    with pytest.raises(ConfigError) as e:
        run_sample.parse_args(_train_irn(voc, tmp_path / "w", 77, 5))
    assert str(e.value) == ("--irn_crop_size 77: IRN's stride-4 map of a 77-pixel crop is 20x20, its affinity "
                            "labels 19x19 (crop/4 rounded half to even); use --irn_crop_size 76 or 78")


@pytest.mark.parametrize("flag, steps", [("--radius", "train_irn"), ("--rw_radius", "make_sem_seg")])
def test_a_radius_below_two_is_refused_when_its_step_runs(voc, tmp_path, flag, steps):
    work = tmp_path / "w"
    with pytest.raises(ConfigError, match=f"^{flag}: path radius must be >= 2, got 1$"):
        run_sample.parse_args(_argv(voc, work, "--steps", steps, flag, "1"))
    run_sample.parse_args(_argv(voc, work, "--steps", "train_cam", flag, "1", "--irn_crop_size", "8"))


def test_the_crop_rule_is_what_the_network_and_the_path_index_do():
    """Accepted exactly when IRN's output map equals the label map and the path index has a window."""
    from datasets.affinity import PathIndex
    from irn.misc.settings import irn_crop_problem
    from irn.net.resnet50_irn import Net
    from datasets.views import reduced_size
    net = Net(18).eval()
    with torch.no_grad():
        maps = {c: tuple(net.edge_and_displacement(torch.zeros(1, 3, c, c))[0].shape[-2:]) for c in range(8, 100)}
    for radius in range(2, 13):
        index = PathIndex(radius)
        for crop, out in maps.items():
            try:
                works = out == reduced_size(crop) and index.window(out) is not None
            except ValueError:
                works = False
            assert (irn_crop_problem(crop, radius) is None) == works, (crop, radius)

"""First stage settings: configs/first_stage/*.yaml through the second stage's loader, the
reference's flags as aliases of the keys, key=value overrides and --print-config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from irn import run_sample
from irn.misc import settings
from utils.config import load_yaml
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"

VOC_YAML = REPO / "configs/first_stage/voc.yaml"


def _args(tmp_path: Path, *more: str):
    return vars(run_sample.parse_args(["--work_dir", str(tmp_path / "w"), *more]))


def test_every_key_has_its_flag_and_every_flag_is_a_key():
    parser_keys = {a.dest for a in run_sample.build_parser()._actions} - {"help", "config", "print_config",
                                                                         "overrides"}
    assert parser_keys == set(settings.KEYS)
    assert list(load_yaml(VOC_YAML)) == list(settings.KEYS)  # the file holds every key, in the same order


@pytest.mark.parametrize("flag, override, yaml_text", [
    (["--cam_num_epoches", "2"], ["cam_num_epoches=2"], "cam_num_epoches: 2"),
    (["--cam_resize_long", "96,160"], ["cam_resize_long=[96,160]"], "cam_resize_long: [96, 160]"),
    (["--cam_scales", "1.0,0.5"], ["cam_scales=[1.0,0.5]"], "cam_scales: [1.0, 0.5]"),
    (["--cam_eval_sweep", "0.1,0.3"], ["cam_eval_sweep=[0.1,0.3]"], "cam_eval_sweep: [0.1, 0.3]"),
    (["--cam_val_loss", "False"], ["cam_val_loss=false"], "cam_val_loss: false"),
    (["--determ"], ["determ=true"], "determ: true"),
    (["--steps", "eval_cam,train_cam"], ["steps=train_cam,eval_cam"], "steps: train_cam,eval_cam"),
    (["--voc12_root", "/data/VOC2012"], ["voc12_root=/data/VOC2012"], "voc12_root: /data/VOC2012"),
    (["--irn_infer_pad_to", "512"], ["irn_infer_pad_to=512"], "irn_infer_pad_to: 512"),
    (["--max_images", "3"], ["max_images=3"], "max_images: 3"),
    (["--export_to", "/data/x"], ["export_to=/data/x"], "export_to: /data/x"),
    (["--conf_fg_thres", "0.6"], ["conf_fg_thres=0.6"], "conf_fg_thres: 0.6"),
])
def test_a_flag_a_key_value_and_a_file_mean_the_same(tmp_path, flag, override, yaml_text):
    own = tmp_path / "own.yaml"
    own.write_text(f"_base_: {VOC_YAML}\n{yaml_text}\n")
    by_flag, by_override = _args(tmp_path, *flag), _args(tmp_path, *override)
    by_file = _args(tmp_path, "--config", str(own))
    assert by_flag == by_override == by_file
    key = flag[0][2:]
    assert by_flag[key] != _args(tmp_path)[key]  # the value did change


def test_file_then_flags_then_key_value_last_wins(tmp_path):
    assert _args(tmp_path, "--cam_num_epoches", "3", "cam_num_epoches=2")["cam_num_epoches"] == 2
    assert _args(tmp_path, "cam_num_epoches=2", "--cam_num_epoches", "3")["cam_num_epoches"] == 2
    demo = ["--config", str(REPO / "configs/first_stage/demo.yaml")]
    assert _args(tmp_path, *demo)["cam_num_epoches"] == 10
    assert _args(tmp_path, *demo, "--cam_num_epoches", "3")["cam_num_epoches"] == 3


def test_the_data_set_picks_its_file_and_a_file_keeps_its_data_set(tmp_path):
    coco = _args(tmp_path, "--dataset", "coco")
    assert (coco["conf_fg_thres"], coco["conf_bg_thres"]) == (0.35, 0.10)
    assert _args(tmp_path, "dataset=coco") == coco
    demo_coco = _args(tmp_path, "--config", str(REPO / "configs/first_stage/demo_coco.yaml"), "--dataset", "coco")
    assert demo_coco["dataset"] == "coco" and demo_coco["conf_fg_thres"] == 0.6
    with pytest.raises(ConfigError, match=r"voc\.yaml holds the settings of dataset 'voc', not 'coco': use "
                                          r".*configs/first_stage/coco\.yaml"):
        run_sample.parse_args(["--config", str(VOC_YAML), "--dataset", "coco", "--work_dir", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["cam_num_epoch=2"], "unknown config key 'cam_num_epoch'"),
    (["cam_num_epoches=two"], "config key 'cam_num_epoches': expected an integer, got 'two'"),
    (["backbone_depth=101"], "config key 'backbone_depth': 101 is not one of [18, 34, 50]"),
    (["steps=train_cam,bogus"], "config key 'steps': unknown step(s) ['bogus']"),
    (["cam_resize_long=[640,320]"], "--cam_resize_long: expected MIN,MAX with MIN <= MAX, got [640, 320]"),
    (["cam_num_epoches"], "override 'cam_num_epoches' is not of the form key=value"),
])
def test_a_bad_key_or_value_stops_with_its_name_and_exit_2(tmp_path, capsys, argv, message):
    work = tmp_path / "w"
    assert run_sample.cli(["--work_dir", str(work), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not work.exists()  # refused before anything is made


def test_a_file_with_an_unknown_or_missing_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {VOC_YAML}\ncam_num_epochs: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'cam_num_epochs'"):
        run_sample.parse_args(["--config", str(bad), "--work_dir", str(tmp_path)])
    short = tmp_path / "short.yaml"
    short.write_text("dataset: voc\n")
    with pytest.raises(ConfigError, match="config key 'voc12_root' is missing"):
        run_sample.parse_args(["--config", str(short), "--work_dir", str(tmp_path)])


def test_print_config_prints_the_resolved_settings_and_reads_back(tmp_path, capsys):
    work = tmp_path / "w"
    argv = ["--dataset", "coco", "--work_dir", str(work), "--cam_num_epoches", "2", "cam_scales=[1.0]"]
    assert run_sample.cli([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert list(values) == list(settings.KEYS)
    assert (values["dataset"], values["cam_num_epoches"], values["cam_scales"], values["conf_fg_thres"]) == \
        ("coco", 2, [1.0], 0.35)
    assert values["work_dir"] == str(work) and not work.exists()  # printing makes no folder
    assert run_sample.main([*argv, "--print-config"]) == {}
    capsys.readouterr()
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert _args(tmp_path, "--config", str(again)) == {**_args(tmp_path, *argv), "work_dir": work}


def test_help_lists_every_flag_with_its_meaning_and_the_files_values():
    text = run_sample.build_parser().format_help()
    for key in settings.KEYS:
        assert f"--{key}" in text
    assert "--cam_num_epoches CAM_NUM_EPOCHES" in text and "(voc.yaml: 5)" in text
    flat = " ".join(text.split())
    assert "cam_to_ir_label confident-foreground threshold (voc.yaml: 0.3; coco.yaml: 0.35)" in flat
    assert "QUIRK-20 KEEP: the reference's SGD momentum is 1e-4 (voc.yaml: 0.0001)" in flat
    assert "key=value" in text and "--print-config" in text and "--config" in text

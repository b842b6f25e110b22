from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from utils.config import ConfigError, build_config, load_config, load_yaml, to_dict, to_yaml

BECO = REPO / "configs/beco_voc.yaml"


def test_reference_values_are_in_the_config():
    cfg = load_config(BECO)
    # Spot checks against spec second-stage §2-§7.
    assert cfg.data.crop_size == 512 and cfg.data.scale[:2] == [0.5, 0.75]
    assert cfg.data.batch_size == 4 and cfg.train.seed == 3223 and cfg.train.epochs == 80
    assert (cfg.method.threshold, cfg.method.warmup_epochs, cfg.method.mix_prob) == (0.95, 1, 0.5)
    assert (cfg.method.w_hb, cfg.method.w_hi, cfg.method.w_lb, cfg.method.w_li) == (0.2, 0.2, 0.0, 0.0)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.min_lr) == (0.01, 0.9, 1e-4, 1e-5)
    assert cfg.test.scales == [0.5, 0.75, 1.0, 1.25, 1.5]
    crf = cfg.test.crf
    assert (crf.gaussian_sxy, crf.gaussian_compat, crf.bilateral_sxy, crf.bilateral_srgb,
            crf.bilateral_compat, crf.iterations) == (1, 3, 67, 3, 4, 10)


def test_yaml_round_trip():
    cfg = load_config(BECO, ["optim.lr=0.02"])
    again = build_config(yaml.safe_load(to_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nonsense.x=1", "unknown config key 'nonsense'"),
    ("optim.lr=fast", "config key 'optim.lr': expected a number"),
    ("train.epochs=2.5", "config key 'train.epochs': expected an integer"),
    ("train.amp=1", "config key 'train.amp': expected true/false"),
    ("data.mean=3", "config key 'data.mean': expected a list"),
    ("data.scale_mode=zoom", "config key 'data.scale_mode': 'zoom' is not one of"),
    ("data.num_classes=5", "'model.decoder.num_classes' (21) and 'data.num_classes' (5) disagree"),
    ("data.batch_size=3", "config key 'data.batch_size'"),
    ("optim.lr", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(BECO, [override])
    assert message in str(e.value)


def test_missing_key_is_an_error(tmp_path):
    raw = load_yaml(BECO)
    del raw["optim"]["momentum"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="config key 'optim.momentum' is missing"):
        load_config(path)


def test_base_inheritance_and_numeric_override(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {BECO}\noptim:\n  lr: 0.5\n")
    cfg = load_config(child, ["optim.weight_decay=5e-4", "data.synthetic={train: 4, val: 2, test: 1, "
                              "size: [32, 32], classes: 20, seed: 1, colours: class, colour_jitter: 10, "
                              "object_scale: [0.2, 0.3], max_objects: 2}"])
    assert cfg.optim.lr == 0.5 and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.data.synthetic.size == [32, 32]


def test_every_config_file_loads():
    """Second-stage configs build; first-stage option files (*first_stage*.yaml, read by
    tools/demo.py) hold only options that run_sample.py parses, with valid values."""
    sys.path.insert(0, str(REPO / "first-stage" / "irn"))
    sys.path.insert(0, str(REPO / "tools"))
    import run_sample
    from demo import first_stage_argv
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "first_stage" in path.name:
            options = load_yaml(path)
            assert options, path
            args = run_sample.build_parser().parse_args(first_stage_argv(options))
            assert all(getattr(args, k) is not None for k in options), path
        else:
            load_config(path)


def test_main_print_config_applies_flags_and_overrides():
    out = subprocess.run([sys.executable, "main.py", "--config", str(BECO), "--print-config", "--seed", "7",
                          "--amp", "--logging_tag", "beco1", "optim.lr=0.02"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["train"]["seed"] == 7 and cfg["train"]["amp"] is True
    assert cfg["logging"]["tag"] == "beco1" and cfg["optim"]["lr"] == 0.02


def test_main_rejects_bad_key_with_exit_code_2():
    r = subprocess.run([sys.executable, "main.py", "--print-config", "optim.lrr=1"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown config key 'optim.lrr'" in r.stderr

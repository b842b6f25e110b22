from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from engine.config import build_config, load_config
from utils.config import ConfigError, load_yaml, to_dict, to_yaml

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
    ("model.decoder.num_classes=5",
     "unknown config key 'model.decoder.num_classes' (the class count is data.num_classes"),
    ("model.backbone.output_stride=32", "config key 'model.backbone.output_stride': 32 is not one of [8, 16]"),
    ("model.backbone.norm_layer=GN", "config key 'model.backbone.norm_layer': 'GN' is not one of"),
    ("model.name=unet", "config key 'model.name': 'unet' is not one of ['deeplabv2', 'deeplabv3plus', 'segformer']"),
    ("optim.name=adam", "config key 'optim.name': 'adam' is not one of ['adamw', 'sgd']"),
    ("optim.head_lr_mult=0", "config key 'optim.head_lr_mult': must be > 0 or null"),
    ("model.backbone.depht=50", "unknown config key 'model.backbone.depht'"),
    ("data.batch_size=3", "config key 'data.batch_size'"),
    ("optim.lr", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(BECO, [override])
    assert message in str(e.value)


def test_missing_key_is_an_error(tmp_path):
    raw = load_yaml(BECO)
    del raw["method"]["threshold"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="config key 'method.threshold' is missing"):
        load_config(path)


def test_every_registered_kind_has_its_values_file_and_no_file_is_orphaned():
    from models.build import MODELS, OPTIMIZERS
    for section, table in (("model", MODELS), ("optim", OPTIMIZERS)):
        files = {p.stem for p in (REPO / "configs" / section).glob("*.yaml")}
        assert files == set(table), section
        for kind in table:
            cfg = load_config(BECO, [f"{section}.name={kind}"])
            assert getattr(cfg, section).name == kind


def test_method_names_are_the_method_table():
    """engine/beco.py's METHODS is the one list of names: the config takes each of them, refuses any
    other with the table's names in its order, and its even-batch rule is the table's."""
    from engine.beco import METHODS
    assert {name: m.num_nets for name, m in METHODS.items()} == {"beco": 2, "baseline": 1, "baseline_kept": 1}
    for name in METHODS:
        assert load_config(BECO, [f"method.name={name}"]).method.name == name
    for bad in ("BECO", "fixmatch", 1, None, [1]):
        with pytest.raises(ConfigError) as e:
            load_config(BECO, [f"method.name={bad if bad is not None else 'null'}"])
        assert str(e.value) == f"config key 'method.name': {bad!r} is not one of ['beco', 'baseline', 'baseline_kept']"
    assert {name: m.even_batch_reason for name, m in METHODS.items()} == {
        "beco": "BECO mixes batch halves", "baseline": None, "baseline_kept": None}
    assert load_config(BECO, ["method.name=baseline", "data.batch_size=3"]).data.batch_size == 3


def test_a_child_config_that_changes_the_segmenter_drops_the_old_ones_keys(tmp_path):
    child = tmp_path / "v2.yaml"
    child.write_text(f"_base_: {BECO}\nmodel:\n  name: deeplabv2\n  backbone:\n    depth: 50\n")
    cfg = load_config(child)
    assert cfg.model.name == "deeplabv2" and cfg.model.backbone.depth == 50
    assert cfg.model.backbone.output_stride == 8 and cfg.model.decoder.atrous_rates == [6, 12, 18, 24]
    assert not hasattr(cfg.model.backbone, "multi_grid")
    # The same kind merges as any section does: demo.yaml keeps the base's other values.
    demo = load_config(REPO / "configs/demo.yaml")
    assert demo.model.backbone.depth == 18 and demo.model.backbone.multi_grid == [1, 2, 4]


def test_a_kind_override_applies_first_and_starts_from_the_new_kinds_values():
    cfg = load_config(REPO / "configs/demo.yaml", ["model.backbone.depth=50", "model.name=deeplabv2"])
    assert cfg.model.name == "deeplabv2" and cfg.model.backbone.depth == 50
    assert cfg.model.backbone.pretrained == "data/model_zoo/resnet-101_v2.pth"  # demo's null was deeplabv3plus's
    same = load_config(REPO / "configs/demo.yaml", ["model.name=deeplabv3plus"])
    assert same.model.backbone.depth == 18 and same.model.backbone.pretrained is None
    adamw = load_config(REPO / "configs/demo.yaml", ["optim.name=adamw"])
    assert (adamw.optim.lr, adamw.optim.head_lr_mult, adamw.optim.betas) == (6e-5, 10.0, [0.9, 0.999])
    with pytest.raises(ConfigError, match="unknown config key 'model.backbone.depth'"):
        load_config(BECO, ["model.name=segformer", "model.backbone.depth=18"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.momentum'"):
        load_config(BECO, ["optim.name=adamw", "optim.momentum=0.9"])


def test_family_configs_hold_the_reference_values():
    v2 = load_config(REPO / "configs/beco_voc_deeplabv2.yaml")
    assert (v2.model.backbone.depth, v2.model.backbone.output_stride, v2.model.decoder.init_std) == (101, 8, 0.01)
    assert v2.model.backbone.pretrained == "data/model_zoo/resnet-101_v2.pth"
    b2 = load_config(REPO / "configs/beco_voc_segformer_b2.yaml")
    assert (b2.model.backbone.variety, b2.model.backbone.drop_path_rate) == ("b2", 0.1)
    assert (b2.model.decoder.embed_dim, b2.model.decoder.channels, b2.model.decoder.dropout) == (768, 256, 0.1)
    assert b2.model.backbone.pretrained == "data/model_zoo/mit_b2.pth"
    for cfg in (v2, b2):  # QUIRK-S12: the reference's SGD for every segmenter
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.head_lr_mult) == ("sgd", 0.01, None)
        assert to_dict(cfg)["method"] == to_dict(load_config(BECO))["method"]


def test_a_config_saved_before_segmenters_were_named_still_loads():
    """A run's config.yaml in the old layout (model.decoder.num_classes, decoder.align_corners,
    optim without a name, no COCO-era keys) builds to today's DeepLabV3+/SGD config with the
    same values."""
    new = to_dict(load_config(REPO / "configs/demo.yaml"))
    old = yaml.safe_load(yaml.safe_dump(new))
    old["model"] = {"backbone": new["model"]["backbone"],
                    "decoder": {**new["model"]["decoder"], "num_classes": 6, "align_corners": True}}
    old["optim"] = {k: v for k, v in new["optim"].items() if k not in ("name", "head_lr_mult")}
    # Keys that came with COCO: a data set's own layout keys and validation / score-map options.
    for section, keys in (("data", ("mask_size_mismatch", "truncated_images")),
                          ("train", ("val_subset", "val_subset_seed", "val_mode", "save_val_logits")),
                          ("test", ("save_logits", "logits_format", "compact_threshold", "compact_max_classes"))):
        for key in keys:
            del old[section][key]
    cfg = build_config(old)
    assert to_dict(cfg)["data"] == new["data"] and to_dict(cfg)["train"] == new["train"]
    assert to_dict(cfg)["test"] == new["test"]
    assert cfg.model.name == "deeplabv3plus" and cfg.model.align_corners is True
    assert to_dict(cfg)["model"]["backbone"] == new["model"]["backbone"]
    assert to_dict(cfg)["optim"] == new["optim"]


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
    """Second-stage configs build; first-stage settings files (configs/first_stage/*.yaml, read by
    run_sample.py and tools/demo.py) hold every key run_sample.py knows, with valid values; a study
    (noise_study*.yaml, mask_study*.yaml: tools/noise_study.py, tools/mask_study.py) builds every
    method's config with its overrides."""
    from tools.demo import first_stage_settings
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith(("noise_study", "mask_study")):
            from tools import mask_study, noise_study
            study = (mask_study if path.name.startswith("mask_study") else noise_study).load_study(path)
            for method in study["methods"].values():
                load_config(REPO / method["config"], [*noise_study.data_overrides(study), *study["train_overrides"],
                                                      *method.get("overrides", [])])
            first_stage_settings(REPO / study["first_stage_config"])
        else:
            load_config(path)
    first_stage = sorted((REPO / "configs" / "first_stage").glob("*.yaml"))
    assert [p.name for p in first_stage] == ["coco.yaml", "demo.yaml", "demo_coco.yaml", "voc.yaml"]
    for path in first_stage:
        assert first_stage_settings(path).dataset == ("coco" if "coco" in path.name else "voc"), path


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


@pytest.mark.parametrize("total, world, accum, per_process", [
    (16, 4, 1, 4), (16, 8, 1, 2), (16, 1, 4, 4), (16, 2, 2, 4), (16, 1, 1, 16),
])
def test_total_batch_gives_the_per_process_batch(total, world, accum, per_process):
    from engine.config import resolve_batch
    cfg = load_config(REPO / "configs/beco_voc.yaml", [f"data.total_batch_size={total}", f"train.grad_accum={accum}"])
    assert resolve_batch(cfg, world).data.batch_size == per_process
    unset = load_config(REPO / "configs/beco_voc.yaml")
    assert resolve_batch(unset, world).data.batch_size == 4  # data.batch_size as configured


@pytest.mark.parametrize("total, world, accum, message", [
    (16, 3, 1, "16 images do not split evenly over 3 process(es) x 1 accumulation step(s) (train.grad_accum); "
               "use a total of 15 or 18, or run 1, 2, 4, 8, 16 process(es), or another train.grad_accum"),
    (16, 6, 2, "16 images do not split evenly over 6 process(es) x 2 accumulation step(s) (train.grad_accum); "
               "use a total of 12 or 24, or run 1, 2, 4, 8 process(es), or another train.grad_accum"),
    (12, 4, 1, "12 images over 4 process(es) x 1 accumulation step(s) gives 3 per process, and BECO mixes "
               "batch halves, so it must be even"),
])
def test_a_total_batch_that_does_not_split_is_refused_with_sizes_that_would(total, world, accum, message):
    from engine.config import resolve_batch
    cfg = load_config(REPO / "configs/beco_voc.yaml", [f"data.total_batch_size={total}", f"train.grad_accum={accum}"])
    with pytest.raises(ConfigError) as e:
        resolve_batch(cfg, world)
    assert str(e.value) == f"config key 'data.total_batch_size': {message}"


def test_main_refuses_a_total_batch_that_does_not_split_before_any_work(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, "main.py", "--config", "configs/demo.yaml", "--logging_path_base", str(tmp_path),
                        "data.total_batch_size=16"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "16 images do not split evenly over 3 process(es)" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_config_saved_before_the_batch_and_process_group_keys_loads_with_their_values():
    """A run's config.yaml from before data.total_batch_size, train.grad_accum and dist."""
    raw = load_yaml(REPO / "configs/beco_voc.yaml")
    del raw["data"]["total_batch_size"], raw["train"]["grad_accum"], raw["dist"]
    cfg = build_config(raw)
    assert (cfg.data.total_batch_size, cfg.train.grad_accum, cfg.dist.timeout_min) == (None, 1, 30.0)
    without_data = {k: v for k, v in load_yaml(REPO / "configs/beco_voc.yaml").items() if k != "data"}
    with pytest.raises(ConfigError, match="config key 'data' is missing"):
        build_config(without_data)

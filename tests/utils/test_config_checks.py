"""Settings that contradict each other or the code that reads them, and config files that
cannot mean what they say: each is refused when the config is built (ConfigError, exit 2,
naming the key or the file and line), before a run folder exists. Without these checks
each ended in a traceback mid-run, a hang, or trained silently on something else."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from engine.config import load_config, resolve_batch
from utils.config import ConfigError, load_yaml

BECO = REPO / "configs/beco_voc.yaml"
DEMO = REPO / "configs/demo.yaml"


def _refused(overrides: list[str], config: Path = BECO) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config, overrides)
    return str(e.value)


# ----------------------------------------------------------------------------- optim.min_lr


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_floor_above_the_lr_is_refused(optim):
    message = _refused([f"optim.name={optim}", "optim.lr=0.01", "optim.min_lr=0.02"])
    assert message.startswith("config key 'optim.min_lr': 0.02 is above optim.lr 0.01")


def test_a_floor_equal_to_the_lr_is_a_constant_schedule_and_allowed():
    from utils.schedule import poly_factor
    cfg = load_config(BECO, ["optim.lr=0.01", "optim.min_lr=0.01", "optim.head_lr_mult=10"])
    floor = cfg.optim.min_lr / cfg.optim.lr
    # The factor scales every group's own lr (the head's 10x too), so it stays 1 throughout.
    assert [poly_factor(it, 100, cfg.optim.poly_power, floor) for it in (0, 50, 99, 100)] == [1.0] * 4


def test_the_head_multiplier_does_not_excuse_a_floor_above_the_lr():
    message = _refused(["optim.lr=0.01", "optim.min_lr=0.05", "optim.head_lr_mult=10"])
    assert "config key 'optim.min_lr'" in message


# ----------------------------------------------------------------------------- blur kernels


@pytest.mark.parametrize("kernels, probs, bad", [("[4, 5]", "[0.5, 0.5]", 4), ("[3, 0]", "[0.5, 0.5]", 0),
                                                 ("[-3]", "[1.0]", -3)])
def test_even_or_non_positive_blur_kernels_are_refused(kernels, probs, bad):
    message = _refused([f"method.strong_aug.blur_kernels={kernels}",
                        f"method.strong_aug.blur_kernel_probs={probs}"])
    assert message == (f"config key 'method.strong_aug.blur_kernels': a Gaussian kernel size must be odd and "
                       f">= 1, got {bad}")


def test_a_blur_kernel_wider_than_the_crop_is_refused_only_when_blur_runs():
    base = ["data.crop_size=32", "method.strong_aug.blur_kernels=[3, 65]"]
    message = _refused(base)
    assert message == ("config key 'method.strong_aug.blur_kernels': kernel 65 reaches 32 pixels beyond its "
                       "centre, which the 32-pixel crops (data.crop_size) cannot reflect; use kernels <= 63")
    load_config(BECO, base[:1] + ["method.strong_aug.blur_kernels=[3, 63]"])
    load_config(BECO, base + ["method.strong_aug.blur_prob=0.0"])
    load_config(BECO, base + ["method.strong_aug.enabled=false"])


@pytest.mark.slow  # two processes / a main.py start: kept out of make test-fast
def test_main_refuses_an_even_kernel_before_the_run_folder_exists(tmp_path):
    """It failed in the first training step and left a run folder that refused the rerun."""
    r = subprocess.run([sys.executable, "main.py", "--config", str(DEMO), "--logging_path_base", str(tmp_path),
                        "--logging_tag", "even", "method.strong_aug.blur_kernels=[4, 5]"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "error: config key 'method.strong_aug.blur_kernels': a Gaussian kernel size must be odd and >= 1, got 4"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- backbone depth / variety


@pytest.mark.parametrize("config", ["beco_voc.yaml", "beco_voc_deeplabv2.yaml"])
def test_an_unknown_resnet_depth_is_refused_with_the_models_own_depths(config):
    from models.resnet import STAGE_BLOCKS
    message = _refused(["model.backbone.depth=77"], REPO / "configs" / config)
    assert message == (f"config key 'model.backbone.depth': 77 is not a ResNet depth; one of "
                       f"{sorted(STAGE_BLOCKS)}")


def test_every_listed_depth_loads():
    from models.resnet import STAGE_BLOCKS
    for depth in STAGE_BLOCKS:
        assert load_config(BECO, [f"model.backbone.depth={depth}"]).model.backbone.depth == depth


def test_an_unknown_mit_variety_is_refused_with_the_varieties():
    from models.mit import VARIETIES
    message = _refused(["model.name=segformer", "model.backbone.variety=b9"])
    assert message.startswith("config key 'model.backbone.variety': 'b9' is not one of")
    assert all(repr(v) in message for v in VARIETIES)


# ----------------------------------------------------------------------------- config files


def test_a_base_cycle_names_its_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("_base_: b.yaml\noptim:\n  lr: 0.1\n")
    b.write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(a)
    assert str(e.value) == f"config _base_ cycle: {a} -> {b} -> {a}"


def test_a_file_that_is_its_own_base_is_a_cycle(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("_base_: ./a.yaml\n")
    with pytest.raises(ConfigError, match=r"config _base_ cycle: .*a\.yaml -> .*a\.yaml$"):
        load_config(a)


def test_a_chain_of_bases_is_not_a_cycle(tmp_path):
    (tmp_path / "mid.yaml").write_text(f"_base_: {BECO}\noptim:\n  lr: 0.3\n")
    (tmp_path / "top.yaml").write_text("_base_: mid.yaml\ntrain:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.optim.lr, cfg.train.epochs) == (0.3, 2)


def test_a_duplicate_key_names_the_file_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"_base_: {BECO}\noptim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: line 5: key 'lr' appears twice in one mapping (first on line 3)"
    path.write_text(f"_base_: {BECO}\noptim: {{lr: 0.1, lr: 0.2}}\n")  # one line, flow style
    with pytest.raises(ConfigError, match=r"line 2: key 'lr' appears twice in one mapping \(first on line 2\)"):
        load_config(path)


def test_a_duplicate_section_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"_base_: {BECO}\ntrain:\n  epochs: 2\noptim:\n  lr: 0.1\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 6: key 'train' appears twice in one mapping "
                                          r"\(first on line 2\)"):
        load_config(path)


def test_the_same_key_in_other_mappings_and_repeated_overrides_are_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"_base_: {BECO}\ndata:\n  batch_size: 2\ntrain:\n  log_interval: 5\ntest:\n"
                    "  crf:\n    iterations: 5\n")
    cfg = load_config(path, ["optim.lr=0.1", "optim.lr=0.2"])  # overrides: the last wins
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.test.crf.iterations) == (0.2, 2, 5)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    text = f"_base_: {BECO}\noptim:\n  <<: {{lr: 0.1, momentum: 0.8}}\n  lr: 0.2\n"
    path.write_text(text)
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.8)


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("key, config, meaning", [
    ("train.seed", BECO, "must be in [0, 4294967295]"),  # numpy's global generator
    ("train.val_subset_seed", BECO, "must be >= 0"),      # np.random.default_rng: no upper bound
    ("data.synthetic.seed", DEMO, "must be >= 0"),
])
def test_a_negative_seed_is_refused(key, config, meaning):
    assert _refused([f"{key}=-1"], config) == f"config key '{key}': {meaning}, got -1"
    assert load_config(config, [f"{key}=0"])


def test_numpys_largest_seed_is_the_bound():
    assert load_config(BECO, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    assert _refused([f"train.seed={2**32}"]) == "config key 'train.seed': must be in [0, 4294967295], got 4294967296"


def test_a_seed_whose_worker_seeds_pass_numpys_bound_is_refused_for_the_process_count():
    """Process r seeds numpy with seed + r, loader worker w of process r with seed + workers*r + w:
    past 2**32 - 1 the first with workers hung the run."""
    top = 2**32 - 1
    cfg = load_config(BECO, [f"train.seed={top - 7}", "data.num_workers=4"])
    assert resolve_batch(cfg, 2).train.seed == top - 7  # largest: seed + 4*2 - 1 = top
    with pytest.raises(ConfigError) as e:
        resolve_batch(load_config(BECO, [f"train.seed={top - 7}", "data.num_workers=4"]), 3)
    assert str(e.value) == (f"config key 'train.seed': {top - 7} gives 3 process(es) x 4 loader worker(s) "
                            f"(data.num_workers) seeds up to {top + 4}, past numpy's {top}; use at most {top - 11}")
    no_workers = load_config(BECO, [f"train.seed={top}", "data.num_workers=0"])
    with pytest.raises(ConfigError, match=f"config key 'train.seed': {top} gives 2 process"):
        resolve_batch(no_workers, 2)


# ----------------------------------------------------------------------------- logging.path_base


def test_a_path_base_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "runs"
    f.write_text("")
    assert _refused([f"logging.path_base={f}"]) == f"config key 'logging.path_base': {f} is a file, not a folder"
    deeper = f / "sub"
    assert _refused([f"logging.path_base={deeper}"]) == \
        f"config key 'logging.path_base': {deeper} lies under {f}, which is a file"
    assert load_config(BECO, [f"logging.path_base={tmp_path / 'new' / 'runs'}"])  # made when the run starts


@pytest.mark.parametrize("test", [False, True])
def test_main_refuses_a_file_as_path_base_for_training_and_testing(tmp_path, test):
    import main as main_mod
    f = tmp_path / "runs"
    f.write_text("")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # in this process: an interpreter and torch start cost 4 s a call
        rc = main_mod.main(["--config", str(DEMO), "--logging_path_base", str(f), "--logging_tag", "x",
                            *(["--test"] if test else [])])
    assert rc == 2 and err.getvalue().strip() == f"error: config key 'logging.path_base': {f} is a file, not a folder"


# ----------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("override, message", [
    ("optim.betas=[1.5, 0.999]", "config key 'optim.betas': expected two values in [0, 1), got [1.5, 0.999]"),
    ("optim.betas=[0.9]", "config key 'optim.betas': expected two values in [0, 1), got [0.9]"),
    ("optim.eps=-1", "config key 'optim.eps': must be >= 0, got -1.0"),
])
def test_adamw_values_torch_refuses_are_refused_with_the_config(override, message):
    assert _refused(["optim.name=adamw", override]) == message

"""First stage driver: IRN pseudo-labels and confidence masks for VOC or COCO 2014.

    python first-stage/irn/run_sample.py --voc12_root data/VOC2012 --work_dir data/first_stage \\
        --backbone_weights model_weights/resnet50-19c8e357.pth --steps all --export_to data/
    python first-stage/irn/run_sample.py --dataset coco --coco_root data/coco --work_dir data/first_stage_coco \\
        --backbone_weights model_weights/resnet50-19c8e357.pth --steps all --export_to data/coco/

Settings (misc/settings.py): configs/first_stage/voc.yaml (the reference's values, spec §3.1),
coco.yaml with --dataset coco, or --config FILE (a file of its own starts with `_base_: voc.yaml`).
Each key is also the reference's flag of the same name: `--cam_num_epoches 2` and `cam_num_epoches=2`
mean the same; the file comes first, then the flags, then key=value (last wins). --print-config
prints the resolved settings as YAML; a key the file does not know stops the run, naming it.

Steps run in this fixed order (any subset via --steps a,b,c or --steps all):
    train_cam, make_cam, eval_cam, cam_to_ir_label, train_irn, make_sem_seg, eval_sem_seg,
    gen_mask, export
Everything is written under --work_dir:
    sess/                 CAM and IRN weights
    result/cam            <id>.npy  {keys, cam, high_res}
    result/ir_label       <id>.png  0 / 1..C / 255 seeds for IRN
    result/sem_seg        <id>.png  pseudo-labels 0..C
    result/score          <id>.pt   {pred, score, keys}
    result/mask_irn       <id>.png  confidence masks (RGB 0/255)
    logs/, log.txt (appended), summary.json (each step's time and metric, merged across runs;
                          "runtime": --determ, threads, CPU kernels, library versions of the last run)
Each output folder holds _provenance.json (sess/: _provenance.<step>.json): the options and inputs
that made it (utils/provenance.py). A step reuses outputs only when the record matches; when it
differs the run stops before the first step, naming each difference (--overwrite redoes them).
Quirks kept by default sit behind named settings.

--dataset voc (default, C = 20): <voc12_root>/JPEGImages, SegmentationClass, ImageSets/Segmentation.
--dataset coco (C = 80, spec §16): the tree of tools/prepare_coco.py under --coco_root
(train2014/, val2014/, mask/{train,val}2014/<int id>.png, lists/{train,val}2014.txt,
cls_labels_{train,val}2014.json). CAM training, make_cam, cam_to_ir_label, IRN training and
its mean-shift pass, make_sem_seg and the evaluation (mask/train2014, 81 classes, no void) run
on train2014; the CAM validation loss on val2014. Every output is named by the file stem
(COCO_train2014_000000000009.png). coco.yaml's seed thresholds: conf_fg_thres 0.35 and
conf_bg_thres 0.10 (VOC 0.30 / 0.05). IRN inference runs on the unpadded image
(irn_infer_pad_to null, BECO). Decisions on the reference's COCO gaps:
  QUIRK-17  the CAM network is the repository's VOC/IRN one with 80 classes, gradients cut
            after layer2 (--cam_freeze_until stage2, the default); --cam_freeze_until stem gives
            the ReCAM-style variant (layer1/layer2 trainable, only the stem frozen).
  QUIRK-15  an image without any class gets an all-background pseudo-label and a full-size
            mask: --no_class_mask random_half (default: half its pixels, seeded by --seed and
            the id) or zero (no pixel confident).
  QUIRK-18  every evaluation accumulates its confusion matrix image by image.
make_cam and make_sem_seg use one process per visible GPU (or --cpu_shards on the CPU),
cam_to_ir_label --num_workers CRF processes; results do not depend on the split.

Before the first step the data the chosen steps read is checked in full (datasets/verify.py):
the data root (--voc12_root / --coco_root), every id's image and image-level labels (VOC: the
Annotations XML exists and parses, or --cls_labels holds the id; COCO: cls_labels_<split>2014.json)
of the train and val lists, the infer list's images, the evaluation ids' ground truth. A bad
file stops the run naming the first bad id, its file and how many fail. Images without any
class are reported then (log warning, "preflight" in summary.json, logs/no_class_ids.txt) and
counted again by gen_mask and export. --no_class_mask skip is refused: the second stage trains
on every id of its own list (VOC train_aug.txt, COCO train2014/) and needs a label and a mask
for each, so the export cannot leave images out.

Errors, as main.py reports them: an error of the project's own types (bad or missing data,
option values argparse cannot check, outputs of earlier steps that do not fit) prints one line
"error: <message>" on stderr, its traceback goes to <work_dir>/log.txt, and the exit code is
2 for option / usage errors, 1 for data and run errors (argparse's own errors: 2). Anything
else is a bug and keeps its traceback. main(argv) raises them all (Python callers); cli(argv)
is the command.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from datasets.handoff import MASK_DIR, PSEUDO_LABEL_DIR
from datasets.views import data_source
from datasets.verify import (first_stage_preflight, known_no_class, no_class_report, no_class_sentence,
                             policy_text, shown)
from irn.misc import settings
from irn.misc.runtime import LOGGER_NAME, configure_runtime, read_ids
from irn.misc.settings import STEPS
from utils import provenance
from utils.config import to_yaml
from utils.errors import BecoError, MissingInputError, RunError, one_line, spawned_error
from utils.io import save_json
from utils.runtime import set_seed

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# step name -> module under step/ (imported lazily: PART B's steps may be absent)
STEP_MODULES: dict[str, str] = {
    "train_cam": "irn.step.train_cam", "make_cam": "irn.step.make_cam", "eval_cam": "irn.step.eval_cam",
    "cam_to_ir_label": "irn.step.cam_to_ir_label", "train_irn": "irn.step.train_irn",
    "make_sem_seg": "irn.step.make_sem_seg_labels", "eval_sem_seg": "irn.step.eval_sem_seg",
    "gen_mask": "irn.step.gen_mask",
}


# ----------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    """The command line: --config, --print-config, key=value and the reference's flags."""
    return settings.build_parser(__doc__)


def read_command(argv: list[str] | None = None) -> tuple[settings.FirstStageCfg, bool]:
    """(the resolved settings, whether --print-config asks only to print them); checked."""
    command = build_parser().parse_intermixed_args(argv)  # key=value pairs may come before or after flags
    cfg = settings.resolve_config(command)
    settings.check_options(settings.to_namespace(cfg))
    return cfg, command.print_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Settings checked (ConfigError: exit 2), as the steps read them, with the derived paths (created)."""
    cfg, _ = read_command(argv)
    return settings.resolve_paths(settings.to_namespace(cfg))


# ----------------------------------------------------------------------------- logging and summary


def setup_logging(args: argparse.Namespace) -> logging.Logger:
    """Console + ``<work_dir>/log.txt`` in append mode (QUIRK-7 fixed)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(args.log_name, mode="a")):
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


def read_summary(summary_path: Path) -> dict[str, Any]:
    """summary.json as it is (empty when missing or cut by a kill: it is rewritten whole)."""
    if summary_path.is_file():
        try:
            return json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def record_step(summary_path: Path, step: str, seconds: float, metrics: dict[str, Any],
                args: argparse.Namespace) -> None:
    """Merge one step's entry into summary.json (re-read each time: runs accumulate)."""
    summary = read_summary(summary_path)
    steps = summary.setdefault("steps", {})
    now = _dt.datetime.now().isoformat(timespec="seconds")
    if metrics.get("skipped") and step in steps and not steps[step].get("metrics", {}).get("skipped"):
        steps[step]["last_skipped"] = now  # outputs already there: keep the run that made them
    else:
        steps[step] = {"seconds": round(seconds, 3), "finished": now, "metrics": _json_safe(metrics)}
    summary["config"] = {k: _json_safe(v) for k, v in sorted(vars(args).items())}
    save_json(summary_path, summary)


def record_preflight(summary_path: Path, report: dict[str, Any]) -> None:
    """summary.json's "preflight": what was checked before the steps, the images without class."""
    summary = read_summary(summary_path)
    summary["preflight"] = {"finished": _dt.datetime.now().isoformat(timespec="seconds"), **_json_safe(report)}
    save_json(summary_path, summary)


def record_runtime(summary_path: Path, facts: dict[str, Any]) -> None:
    """summary.json's "runtime": --determ, threads, CPU kernels and library versions of the last run.

    The same seed gives the same numbers only where these agree (and never across CPUs whose
    oneDNN / ATen kernels differ), so two runs' summaries show why their numbers may differ.
    """
    summary = read_summary(summary_path)
    summary["runtime"] = {"recorded": _dt.datetime.now().isoformat(timespec="seconds"), **_json_safe(facts)}
    save_json(summary_path, summary)


# ----------------------------------------------------------------------------- export


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Copy pseudo-labels and masks to where the second stage reads them (§15), train_list ids only.

    Every id is exported, those without any class too (all-background label, the mask of
    --no_class_mask): the second stage's list holds them. They are counted and named.
    """
    log = logging.getLogger(LOGGER_NAME)
    if args.export_to is None:
        # `--steps all` includes export; without a target there is nothing to do, say so loudly.
        log.warning("export: no --export_to DIR given, nothing exported")
        return {"skipped": True}
    ids = read_ids(args, "train_list")
    counts: dict[str, Any] = {}
    for src_dir, name in ((args.sem_seg_out_dir, PSEUDO_LABEL_DIR), (args.mask_out_dir, MASK_DIR)):
        missing = [i for i in ids if not (Path(src_dir) / f"{i}.png").is_file()]
        if missing:
            raise MissingInputError(f"export: {len(missing)} of {len(ids)} files missing in {src_dir}, e.g. id "
                                    f"'{missing[0]}': {Path(src_dir) / (missing[0] + '.png')}")
    for src_dir, name in ((args.sem_seg_out_dir, PSEUDO_LABEL_DIR), (args.mask_out_dir, MASK_DIR)):
        dst = Path(args.export_to) / name
        dst.mkdir(parents=True, exist_ok=True)
        for i in ids:
            tmp = dst / f".{i}.png.tmp"
            shutil.copyfile(Path(src_dir) / f"{i}.png", tmp)
            os.replace(tmp, dst / f"{i}.png")  # atomic per file
        counts[name] = len(ids)
    counts.update(_exported_no_class(args, ids, log))
    return {"export_to": str(args.export_to), **counts}


def _exported_no_class(args: argparse.Namespace, ids: list[str], log: logging.Logger) -> dict[str, Any]:
    """Count and name the exported images without class; their policy read off their masks."""
    from irn.step.gen_mask import no_class_policy_of, read_mask_png  # a step module: loaded when a step needs it
    empty = known_no_class(data_source(args), ids)
    if empty is None:
        log.warning("export: image-level labels of the train list unavailable: cannot tell which exported images "
                    "have no class")
        return {"no_class_images": None}
    out = no_class_report(empty)
    if not empty:
        return out
    policies = {no_class_policy_of(read_mask_png(Path(args.mask_out_dir) / f"{i}.png"), args.mask_thd) for i in empty}
    if len(policies) == 1 and None not in policies:
        out["no_class_mask"] = policies.pop()
        text = policy_text(out["no_class_mask"], args.mask_thd)
    else:
        out["no_class_mask"] = "mixed"
        text = ("their masks were made with different --no_class_mask values (rerun gen_mask with --overwrite "
                "for one policy)")
    log.warning(f"export: {no_class_sentence(len(empty), text)}; ids {shown(empty)}")
    return out


# ----------------------------------------------------------------------------- provenance

# What each step's outputs depend on (utils/provenance.py): the options that change their bytes,
# the earlier steps whose outputs it reads, and the lists and files it reads. Threads, devices,
# worker counts and progress bars are left out: they change float rounding at most.
# outputs: (path option, glob of the files the step writes there; None = the path is the file).
STEP_PROVENANCE: dict[str, dict[str, Any]] = {
    "train_cam": {"outputs": (("cam_weights_name", None),), "after": (), "lists": ("train_list",),
                  "files": ("backbone_weights", "cls_labels"),
                  "settings": ("backbone_depth", "backbone_bn", "cam_network", "cam_crop_size", "cam_resize_long",
                               "cam_batch_size", "cam_num_epoches", "cam_learning_rate", "cam_weight_decay",
                               "cam_classifier_lr_mult", "cam_freeze_until", "sgd_momentum", "poly_power", "seed")},
    "make_cam": {"outputs": (("cam_out_dir", "*.npy"),), "after": ("train_cam",), "lists": ("train_list",),
                 "files": ("cls_labels",), "settings": ("backbone_depth", "cam_network", "cam_scales")},
    "cam_to_ir_label": {"outputs": (("ir_label_out_dir", "*.png"),), "after": ("make_cam",), "lists": ("train_list",),
                        "files": (), "settings": ("conf_fg_thres", "conf_bg_thres", "crf_gt_prob", "crf_iters",
                                                  "crf_gauss_sxy", "crf_gauss_compat", "crf_bi_sxy", "crf_bi_srgb",
                                                  "crf_bi_compat")},
    "train_irn": {"outputs": (("irn_weights_name", None),), "after": ("train_cam", "cam_to_ir_label"),
                  "lists": ("train_list", "infer_list"), "files": ("backbone_weights",),
                  "settings": ("backbone_depth", "irn_network", "irn_crop_size", "irn_batch_size", "irn_num_epoches",
                               "irn_learning_rate", "irn_weight_decay", "irn_disp_lr_mult", "irn_backbone_from_cam",
                               "irn_train_backbone", "radius", "sgd_momentum", "poly_power", "seed")},
    "make_sem_seg": {"outputs": (("sem_seg_out_dir", "*.png"), ("score_dir", "*.pt")),
                     "after": ("make_cam", "train_irn"), "lists": ("train_list",), "files": ("cls_labels",),
                     "settings": ("backbone_depth", "irn_network", "beta", "exp_times", "rw_radius", "rw_mode",
                                  "rw_sparse_dtype", "rw_allow_tf32", "sem_seg_bg_thres", "irn_infer_pad_to",
                                  "score_fp16")},
    "gen_mask": {"outputs": (("mask_out_dir", "*.png"),), "after": ("make_sem_seg",), "lists": ("train_list",),
                 "files": ("cls_labels",), "settings": ("mask_thd", "margin_tie_mode", "no_class_mask", "seed")},
    "export": {"outputs": (("export_to", f"{PSEUDO_LABEL_DIR}/*.png"), ("export_to", f"{MASK_DIR}/*.png")),
               "after": ("make_sem_seg", "gen_mask"), "lists": ("train_list",), "files": (), "settings": ()},
}


def _output_places(args: argparse.Namespace, step: str) -> list[tuple[Path, tuple[str, ...], str]]:
    """(folder, output globs, record file name) of each place ``step`` writes to."""
    places = []
    for option, pattern in STEP_PROVENANCE[step]["outputs"]:
        path = Path(getattr(args, option))
        if pattern is None:  # a weights file in sess/, beside the other step's: one record each
            places.append((path.parent, (path.name,), f"_provenance.{step}.json"))
        elif step == "export":  # two folders the second stage reads, each with its own record
            folder, glob = pattern.split("/")
            places.append((path / folder, (glob,), provenance.RECORD_NAME))
        else:
            places.append((path, (pattern,), provenance.RECORD_NAME))
    return places


def _upstream_identity(args: argparse.Namespace, step: str, made: dict[str, dict]) -> dict[str, Any]:
    """An earlier step's identity: its record as this run makes it, or as its folder holds it."""
    if step in made:
        return {"record": provenance.digest(made[step])}
    folder, globs, name = _output_places(args, step)[0]
    return provenance.folder_input(folder, globs, name)


def step_records(args: argparse.Namespace, steps: list[str]) -> dict[str, dict]:
    """The record of each chosen step (eval steps write nothing and have none), in step order,
    so a step's record holds the records its upstream steps get in this same run."""
    root = args.coco_root if args.dataset == "coco" else args.voc12_root
    made: dict[str, dict] = {}
    for step in STEPS:
        entry = STEP_PROVENANCE.get(step)
        if entry is None or step not in steps:
            continue
        inputs = {f"step:{up}": _upstream_identity(args, up, made) for up in entry["after"]}
        for option in entry["lists"] + entry["files"]:
            value = getattr(args, option)
            inputs[option] = provenance.file_input(value) if value is not None and Path(value).is_file() else {"sha256": None}
        settings = {"dataset": args.dataset, "root": str(Path(root).resolve()), "max_images": args.max_images,
                    **{name: getattr(args, name) for name in entry["settings"]}}
        made[step] = provenance.make_record(f"run_sample.py {step}", inputs, settings)
    return made


def plan_steps(args: argparse.Namespace, steps: list[str]) -> dict[str, list]:
    """Every chosen step's output places checked before the first step runs: a step whose
    outputs were made otherwise stops the run here (OutputExistsError naming both records)."""
    if "export" in steps and args.export_to is None:
        steps = [s for s in steps if s != "export"]  # export without a target writes nothing
    records = step_records(args, steps)
    return {step: [provenance.plan(folder, records[step], globs, overwrite=args.overwrite, record_name=name)
                   for folder, globs, name in _output_places(args, step)]
            for step in records}


def step_runner(name: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    if name == "export":
        return export
    try:
        module = importlib.import_module(STEP_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == STEP_MODULES[name]:
            raise RunError(f"step {name}: module {STEP_MODULES[name]} is not available in this checkout") from None
        raise
    return module.run


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen steps; returns each step's metrics (none with --print-config, which prints
    the settings). Every error propagates (``cli`` reports them)."""
    cfg, print_only = read_command(argv)
    if print_only:
        sys.stdout.write(to_yaml(cfg))
        return {}
    return run_steps(settings.resolve_paths(settings.to_namespace(cfg)), argv)


def run_steps(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    log = setup_logging(args)
    runtime = configure_runtime(args.determ, args.torch_threads)  # before any CUDA work (cuBLAS reads its env)
    os.environ.setdefault("PYTHONHASHSEED", str(args.seed))  # string hashing in the spawned shard processes
    set_seed(args.seed)
    root = args.coco_root if args.dataset == "coco" else args.voc12_root
    log.info(f"run_sample: steps {','.join(args.steps)}; dataset {args.dataset} {root}; work_dir {args.work_dir}")
    log.info("run_sample: " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.backbone_weights is None and any(s in args.steps for s in ("train_cam", "train_irn")):
        log.warning("run_sample: NO --backbone_weights: the backbone trains FROM SCRATCH "
                    "(expect far lower mIoU than the reference; fine for the synthetic demo)")
    log.info("run_sample: runtime " + ", ".join(f"{k} {v}" for k, v in runtime.items() if v not in (None, {}, [])))
    record_runtime(args.summary_path, runtime)
    runners = {name: step_runner(name) for name in args.steps}  # a missing step module fails before any work
    record_preflight(args.summary_path, first_stage_preflight(args, data_source(args), args.steps, log))
    plans = plan_steps(args, args.steps)
    results: dict[str, Any] = {}
    for name in args.steps:
        run = runners[name]
        for plan in plans.get(name, []):  # outputs of other settings go (--overwrite) just before the step
            provenance.commit(plan)
        set_seed(args.seed)  # each step reproducible on its own, whatever ran before
        log.info(f"== {name}")
        start = time.perf_counter()
        try:
            metrics = run(args) or {}
        except BaseException:
            for plan in plans.get(name, []):
                provenance.withdraw(plan)
            raise
        seconds = time.perf_counter() - start
        record_step(args.summary_path, name, seconds, metrics, args)
        shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        log.info(f"== {name} done in {seconds:.1f} s: {shown}")
        results[name] = metrics
    return results


def _report(message: str, code: int) -> int:
    """One line on stderr; the traceback of the error being handled into log.txt."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, f"error: {message}", None,
                                       sys.exc_info()))
    print(f"error: {message}", file=sys.stderr)
    return code


def cli(argv: list[str] | None = None) -> int:
    """The command: ``main`` with the project's errors reported in one line (exit 2 for option
    errors, 1 for data and run errors); any other exception keeps its traceback."""
    try:
        cfg, print_only = read_command(argv)
        if print_only:
            sys.stdout.write(to_yaml(cfg))
            return 0
        args = settings.resolve_paths(settings.to_namespace(cfg))
    except BecoError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    try:
        run_steps(args, argv)
    except BecoError as e:
        return _report(one_line(e), e.exit_code)
    except Exception as e:
        found = spawned_error(e)  # ours, raised in a make_cam / make_sem_seg shard process
        if found is None:
            raise
        return _report(found[1], found[0])
    return 0


if __name__ == "__main__":
    sys.exit(cli())

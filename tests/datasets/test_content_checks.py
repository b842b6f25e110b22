"""Content that reads fine but would give a wrong number: NaN/Inf in a score map or CAM, an id
listed twice, a label set without foreground or with classes no label uses. Each is refused
(or, for unused classes, warned about) by the one reader of its format, naming the file and id.
test.py's own cases are in tests/cli/test_test_py.py, COCO preparation's in tests/datasets/test_coco_prepare.py."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.readers import DataError, read_id_list
from datasets.segmentation import EvalSet, TrainSet
from datasets.verify import verify
from tests.conftest import REPO, tiny_coco_config, tiny_config, write_tiny_coco, write_tiny_voc
from utils.score_maps import ScoreMapError, compact, load_score_map, save_score_map

IRN = REPO / "first-stage" / "irn"

TRAIN = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]
VAL = ["2008_000001", "2008_000002"]


def _map(num_classes: int = 4, shape=(6, 7), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_classes, *shape)).astype(np.float32) * 3


# ----------------------------------------------------------------------------- score maps

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_dense_map_with_nan_or_inf_is_refused_naming_id_and_file(tmp_path, dtype):
    logits = _map().astype(dtype)
    logits[1, 0, 0] = np.nan
    logits[3, 2, 4] = -np.inf  # a dense map holds logits: -inf is as wrong as NaN
    path = tmp_path / "2008_000001.npy"
    np.save(path, logits)
    with pytest.raises(ScoreMapError) as e:
        load_score_map(path, "2008_000001", 4)
    assert str(e.value) == f"score map for id '2008_000001' holds NaN/Inf at 2 values: {path}"
    assert isinstance(e.value, DataError)


def test_a_compact_map_keeps_its_legitimate_minus_inf_rest_but_no_nan(tmp_path):
    logits = _map()
    # Every class kept: ``rest`` (the dropped classes' log-sum-exp) is -inf everywhere, by design.
    full = save_score_map(tmp_path / "all.npz", logits, "compact", "float32", 0.0, 4)
    assert np.isneginf(full.rest).all()
    assert np.isneginf(load_score_map(tmp_path / "all.npz", "all", 4).rest).all()

    record = compact(logits, 0.2, 2, "float16")
    assert len(record["classes"]) == 2 and np.isfinite(record["rest"]).all()
    bad_logits = {**record, "logits": record["logits"].copy()}
    bad_logits["logits"][0, 1, 1] = np.nan
    bad_rest = {**record, "rest": record["rest"].copy()}
    bad_rest["rest"][0, :3] = np.inf  # +inf would give the dropped classes every pixel's probability
    nan_rest = {**record, "rest": record["rest"].copy()}
    nan_rest["rest"][2, 2] = np.nan
    for name, rec, count in (("a", bad_logits, 1), ("b", bad_rest, 3), ("c", nan_rest, 1)):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **rec)
        with pytest.raises(ScoreMapError, match=rf"^score map for id '{name}' holds NaN/Inf at {count} values: "):
            load_score_map(path, name, 4)


def test_a_reused_map_with_nan_stops_main_py_test(tmp_path):
    """main.py --test reads a map it saved earlier through load_saved_map (the reuse path)."""
    from engine.inference import load_saved_map
    from utils.errors import RunError
    logits = _map()
    logits[0, 0, 0] = np.nan
    path = tmp_path / "2008_000002.npy"
    np.save(path, logits)
    cfg = SimpleNamespace(data=SimpleNamespace(num_classes=4),
                          test=SimpleNamespace(logits_format="dense", logits_dtype="float32"))
    with pytest.raises(RunError, match=r"score map for id '2008_000002' holds NaN/Inf at 1 values: .*2008_000002.npy"):
        load_saved_map(path, "2008_000002", cfg)


# ----------------------------------------------------------------------------- first-stage CAMs and scores

def test_a_cam_file_with_nan_is_refused_by_its_one_reader(tmp_path):
    from irn.misc.cam_io import CamFileError, load_cam, save_cam
    high = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    save_cam(tmp_path / "ok.npy", np.array([0, 4]), high[:, ::4, ::4], high)
    assert load_cam(tmp_path / "ok.npy")["high_res"].shape == (2, 8, 8)
    bad = high.copy()
    bad[1, 3, 3] = np.nan
    save_cam(tmp_path / "2007_000001.npy", np.array([0, 4]), high[:, ::4, ::4], bad)
    with pytest.raises(CamFileError) as e:
        load_cam(tmp_path / "2007_000001.npy", "2007_000001")
    assert str(e.value) == (f"CAM file for id '2007_000001' holds NaN/Inf at 1 values in 'high_res': "
                            f"{tmp_path / '2007_000001.npy'}")
    low = high[:, ::4, ::4].copy()
    low[0, 0, 0] = np.inf
    save_cam(tmp_path / "2007_000002.npy", np.array([0, 4]), low, high)
    with pytest.raises(CamFileError, match=r"'2007_000002' holds NaN/Inf at 1 values in 'cam'"):
        load_cam(tmp_path / "2007_000002.npy", "2007_000002")


def test_eval_cam_stops_at_a_nan_cam_naming_it(tmp_path):
    """eval_cam, cam_to_ir_label and make_sem_seg all read CAMs through misc.cam_io.load_cam."""
    from argparse import Namespace

    from irn.misc.cam_io import CamFileError, save_cam
    from irn.step import eval_cam

    from datasets.synthetic.voc import make_synthetic_voc
    make_synthetic_voc(tmp_path / "data", train=4, val=1, test=0, size=(32, 40), classes=2, seed=0)
    root = tmp_path / "data" / "VOC2012"
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    cam_dir = tmp_path / "cam"
    for n, i in enumerate(ids):
        high = np.full((1, 32, 40), 0.5, np.float32)
        if n == len(ids) - 1:
            high[0, 5, 5] = np.nan  # argmax would take it as the top score: a silent wrong mIoU
        save_cam(cam_dir / f"{i}.npy", np.array([0]), high[:, ::4, ::4], high)
    args = Namespace(dataset="voc", voc12_root=root, chainer_eval_set="train", max_images=None, cls_labels=None,
                     train_list=None, val_list=None, infer_list=None, cam_out_dir=cam_dir,
                     cam_eval_thres=0.15, no_progress=True, cam_eval_sweep=())
    with pytest.raises(CamFileError, match=rf"CAM file for id '{ids[-1]}' holds NaN/Inf"):
        eval_cam.run(args)


def test_a_score_file_with_nan_is_refused_and_gen_mask_exits_1(tmp_path, capsys):
    from irn.step.gen_mask import ScoreFileError, cli, load_score
    from irn.step.make_sem_seg_labels import save_score
    score = torch.tensor([[[0.25, 0.25]], [[0.9, 0.1]]])
    pred = torch.tensor([[1, 0]])
    save_score(tmp_path / "score" / "a.pt", pred, score, torch.tensor([0, 1]))
    score[1, 0, 1] = float("nan")
    path = save_score(tmp_path / "score" / "b.pt", pred, score, torch.tensor([0, 1]))
    with pytest.raises(ScoreFileError) as e:
        load_score(path, "b")
    assert str(e.value) == f"score file for id 'b' holds NaN/Inf at 1 values: {path}"
    (tmp_path / "ids.txt").write_text("a\nb\n")
    rc = cli(["--score_dir", str(tmp_path / "score"), "--out_dir", str(tmp_path / "mask"),
              "--ids", str(tmp_path / "ids.txt"), "--no_progress"])
    assert rc == 1 and "error: score file for id 'b' holds NaN/Inf at 1 values" in capsys.readouterr().err


# ----------------------------------------------------------------------------- duplicate ids

def test_an_id_listed_twice_is_refused_with_both_line_numbers(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("2007_000001\n2007_000002 extra\n\n2007_000003\n2007_000002\n")
    with pytest.raises(DataError) as e:
        read_id_list(path)
    assert str(e.value) == f"id '2007_000002' is listed twice in {path}, on lines 2 and 5"
    path.write_text("a\nb\n")
    assert read_id_list(path) == ["a", "b"]


def test_training_and_evaluation_refuse_a_list_with_a_duplicate(tmp_path):
    root = write_tiny_voc(tmp_path / "data", TRAIN, VAL)
    lists = root / "VOC2012/ImageSets/Segmentation"
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in TRAIN + [TRAIN[1]]))
    with pytest.raises(DataError, match=rf"id '{TRAIN[1]}' is listed twice in .*train_aug.txt, on lines 2 and 5"):
        TrainSet(tiny_config(root).data)
    (lists / "val.txt").write_text(f"{VAL[0]}\n{VAL[0]}\n{VAL[1]}\n")
    with pytest.raises(DataError, match=rf"id '{VAL[0]}' is listed twice in .*val.txt, on lines 1 and 2"):
        EvalSet(tiny_config(root).data, "val")


def test_the_first_stage_refuses_a_list_with_a_duplicate(tmp_path):
    from datasets.views import open_source
    root = tmp_path / "VOC2012"
    lists = root / "ImageSets/Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("2007_000001\n2007_000001\n")
    with pytest.raises(DataError, match=r"id '2007_000001' is listed twice in .*train_aug.txt, on lines 1 and 2"):
        open_source("voc", root).ids("train")


def test_the_first_stage_driver_stops_at_a_duplicate_before_any_step(tmp_path, capsys):
    from irn import run_sample

    from datasets.synthetic.voc import make_synthetic_voc
    make_synthetic_voc(tmp_path / "data", train=4, val=1, test=0, size=(32, 40), classes=2, seed=0)
    voc, work = tmp_path / "data" / "VOC2012", tmp_path / "work"
    lst = voc / "ImageSets/Segmentation/train_aug.txt"
    ids = lst.read_text().split()
    lst.write_text("".join(f"{i}\n" for i in ids + [ids[2]]))
    code = run_sample.cli(["--voc12_root", str(voc), "--work_dir", str(work), "--device", "cpu", "--num_workers", "0",
                           "--no_progress", "--backbone_depth", "18", "--steps", "train_cam"])
    err = capsys.readouterr().err
    assert code == 1 and f"id '{ids[2]}' is listed twice in {lst}, on lines 3 and 5" in err, err
    assert "== train_cam" not in (work / "log.txt").read_text()


def test_a_coco_list_with_a_duplicate_is_refused(tmp_path):
    from datasets.coco import stem_of
    root = write_tiny_coco(tmp_path / "coco", [9, 25], [42])
    (root / "lists").mkdir()
    (root / "lists/train2014.txt").write_text(f"{stem_of('train', 9)}\n{stem_of('train', 25)}\n{stem_of('train', 9)}\n")
    with pytest.raises(DataError, match=r"id 'COCO_train2014_000000000009' is listed twice in .*train2014.txt, "
                                        r"on lines 1 and 3"):
        TrainSet(tiny_coco_config(root, "data.list_dir=lists").data)


def test_a_class_label_file_with_an_id_twice_is_refused(tmp_path):
    from datasets.prepare.cls_labels import FORMAT, LabelError, load_cls_labels
    path = tmp_path / "cls_labels.json"
    # json.loads keeps the last of two equal keys: the first entry would vanish silently.
    path.write_text(f'{{"format": "{FORMAT}", "classes": [], "labels": {{"2007_000001": [0], "2007_000001": [3]}}}}')
    with pytest.raises(LabelError, match=rf"id '2007_000001' appears twice in {path}"):
        load_cls_labels(path)
    assert isinstance(LabelError("x"), DataError)


# ----------------------------------------------------------------------------- foreground and unused classes

@contextlib.contextmanager
def _warnings():
    """WARNING lines of the "beco" logger (it does not propagate once a run has set it up)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("beco")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _write_labels(root: Path, ids: list[str], values: list[np.ndarray], folder: str = "irn_pseudo_label") -> None:
    for i, v in zip(ids, values):
        Image.fromarray(v.astype(np.uint8), mode="L").save(root / folder / f"{i}.png")


def test_training_pseudo_labels_without_any_foreground_are_refused(tmp_path):
    root = write_tiny_voc(tmp_path / "data", TRAIN, VAL)
    background = [np.where(np.random.default_rng(k).random((40, 56)) < 0.1, 255, 0) for k in range(len(TRAIN))]
    _write_labels(root, TRAIN, background)
    # Void only under mask 0, as the data check demands (tests/engine/test_void_labels.py).
    _write_labels(root, TRAIN, [np.where(b == 255, 0, 255) for b in background], "irn_mask")
    with pytest.raises(DataError) as e:
        verify(TrainSet(tiny_config(root).data), progress=False)
    assert str(e.value) == (
        f"none of the 4 training pseudo-labels under {root / 'irn_pseudo_label'} has a foreground pixel "
        f"(every pixel is 0, background, or 255, void): training on them predicts background everywhere and "
        f"scores a meaningless mIoU; is data.pseudo_label_dir (irn_pseudo_label) the first stage's "
        f"pseudo-label output?")
    # One foreground pixel in one image is enough: the check is over the whole set.
    background[2][7, 7] = 3
    _write_labels(root, TRAIN[2:3], background[2:3])
    assert verify(TrainSet(tiny_config(root).data), progress=False)["ids"] == 4


def test_val_ground_truth_without_any_foreground_is_refused(tmp_path):
    root = write_tiny_voc(tmp_path / "data", TRAIN, VAL)
    gt = root / "VOC2012/SegmentationClass"
    for i in VAL:
        Image.fromarray(np.zeros((40, 56), np.uint8), mode="L").save(gt / f"{i}.png")
    with pytest.raises(DataError) as e:
        verify(EvalSet(tiny_config(root).data, "val"), progress=False)
    assert str(e.value) == (
        f"none of the 2 validation ground-truth maps under {gt} has a foreground pixel: an mIoU over "
        f"background alone means nothing; is data.gt_dir (VOC2012/SegmentationClass) the right folder for split 'val'?")
    # Without labels (a test split) there is nothing to check.
    verify(EvalSet(tiny_config(root).data, "val", with_labels=False), progress=False)


def test_classes_no_training_label_uses_are_a_warning_and_the_cache_keeps_them(tmp_path):
    root = write_tiny_voc(tmp_path / "data", TRAIN, VAL)
    rng = np.random.default_rng(0)
    _write_labels(root, TRAIN, [rng.integers(0, 2, (40, 56)) for _ in TRAIN])  # only 0 and 1 of 0..3
    cfg = tiny_config(root).data
    for attempt in ("read", "cached"):
        with _warnings() as records:
            summary = verify(TrainSet(cfg), progress=False)
        assert summary["unused_classes"] == [2, 3], attempt
        assert summary["files_read"] == (12 if attempt == "read" else 0)
        assert [r.getMessage() for r in records] == [(
            f"2 of the 3 foreground classes that data.num_classes (4) declares appear in none of the 4 training "
            f"pseudo-labels under {root / 'irn_pseudo_label'}: 2 bicycle, 3 bird (expected for a small subset of the "
            f"data; otherwise check data.num_classes and the first stage's output)")]
    with _warnings() as records:
        assert verify(TrainSet(tiny_config(root, "data.num_classes=2").data), progress=False)["unused_classes"] == []
    assert records == []


def test_a_cache_from_before_class_counts_is_read_again(tmp_path):
    from datasets.verify import CACHE_NAME
    root = write_tiny_voc(tmp_path / "data", TRAIN, VAL)
    verify(TrainSet(tiny_config(root).data), progress=False)
    cache = json.loads((root / CACHE_NAME).read_text())
    labels = cache["dirs"][str(root / "irn_pseudo_label")]
    for name, entry in labels.items():  # the six fields an older version wrote
        labels[name] = " ".join(entry.split(" ")[:6])
    (root / CACHE_NAME).write_text(json.dumps(cache))
    summary = verify(TrainSet(tiny_config(root).data), progress=False)
    assert summary["files_read"] == 4 and summary["unused_classes"] == []


def test_coco_ground_truth_counts_every_value_but_background(tmp_path):
    """COCO's ground truth has no void value: 0 is background, the rest foreground."""
    root = write_tiny_coco(tmp_path / "coco", [9, 25], [42, 43])
    for i in (42, 43):
        Image.fromarray(np.zeros((40, 56), np.uint8), mode="L").save(root / "mask/val2014" / f"{i}.png")
    with pytest.raises(DataError, match=r"none of the 2 validation ground-truth maps under .*val2014 has a "
                                        r"foreground pixel"):
        verify(EvalSet(tiny_coco_config(root).data, "val"), progress=False)
    with _warnings() as records:
        summary = verify(TrainSet(tiny_coco_config(root).data), progress=False)
    assert summary["unused_classes"] == [c for c in range(1, 81) if c not in (1, 12, 80)]
    (message,) = [r.getMessage() for r in records]
    assert message.startswith("77 of the 80 foreground classes that data.num_classes (81) declares appear in none "
                              f"of the 2 training pseudo-labels under {root / 'irn_pseudo_label'}: 2 bicycle, 3 car, ")
    assert "22 bear and 57 more (ids 23, 24, 25, 26, " in message and "77, 78, 79) (expected for" in message


def test_the_synthetic_sets_pass_and_use_every_class(tmp_path):
    """The generator behind the demo and the tests: foreground everywhere, every class used."""
    from datasets.synthetic.voc import make_synthetic_voc
    make_synthetic_voc(tmp_path / "data", train=12, val=4, test=0, size=(48, 64), classes=5, seed=0,
                       colours="class", object_scale=(0.22, 0.4), max_objects=3)
    cfg = tiny_config(tmp_path / "data", "data.num_classes=6").data
    with _warnings() as records:
        assert verify(TrainSet(cfg), progress=False)["unused_classes"] == []
        verify(EvalSet(cfg, "val"), progress=False)
    assert records == []


def _ranks_decide(rank: int, world: int, root: str) -> dict:
    """In each of 2 gloo ranks: the preflight over a set whose foreground lies in rank 1's share."""
    from datasets.verify import preflight
    from utils.distributed import init_distributed
    info = init_distributed(timeout_min=2)
    cfg = tiny_config(Path(root))
    out: dict = {}
    with _warnings() as records:
        preflight([(TrainSet(cfg.data), "train")], info)
    out["warnings"] = [r.getMessage() for r in records]
    torch.distributed.barrier()
    if rank == 0:  # now no sample has foreground
        _write_labels(Path(root), TRAIN[1::2], [np.zeros((40, 56)), np.zeros((40, 56))])
    torch.distributed.barrier()
    try:
        preflight([(TrainSet(cfg.data), "train")], info)
        out["error"] = None
    except DataError as e:
        out["error"] = str(e)
    torch.distributed.destroy_process_group()
    return out


@pytest.mark.slow  # two processes / a main.py start: kept out of make test-fast
def test_ranks_decide_on_every_rank_s_labels_together(tmp_path):
    """Rank r reads samples r, r + 2, ...: rank 0 alone sees only background here, yet no rank
    refuses, and the warning names only the class no rank saw."""
    from tests.distributed_harness import run_ranks
    root = write_tiny_voc(tmp_path / "data", TRAIN, VAL)
    labels = [np.zeros((40, 56)), np.full((40, 56), 1), np.zeros((40, 56)), np.full((40, 56), 2)]
    _write_labels(root, TRAIN, labels)
    ranks = run_ranks(_ranks_decide, 2, str(root), timeout=240)
    assert [len(out["warnings"]) for out in ranks] == [1, 0]  # logged once, by rank 0 (the run's log)
    assert ": 3 bird (expected for" in ranks[0]["warnings"][0] and "1 of the 3 foreground" in ranks[0]["warnings"][0]
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["error"].startswith(f"none of the 4 training pseudo-labels under {root / 'irn_pseudo_label'}")

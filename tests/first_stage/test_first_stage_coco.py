"""First stage on COCO 2014 (spec first-stage §16): the data source, streaming evaluation, the
no-class rules (QUIRK-15) and an end-to-end run of run_sample.py --dataset coco on a tiny
hand-made prepared tree (tools/prepare_coco.py's layout)."""
from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.coco import COCO_CLASSES, stem_of
from datasets.readers import DataError
from datasets.prepare.cls_labels import save_cls_labels
from datasets.sources import CocoSource, VOCSource
from datasets.views import ClassificationView, InferenceView, data_source, open_source
from utils.metrics import StreamingConfusion, confusion_of_maps, fg_on_gt_background, seen_class_scores

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"

SIZE = (64, 64)
# (image id, label ids) — sparse label ids 1, 12, 80 (CAM indices 0, 11, 79); id 42 has no class.
TRAIN = [(9, [1]), (25, [12]), (30, [1, 80]), (42, []), (49, [12, 80]), (61, [80]), (64, [1, 12]), (72, [1])]
VAL = [(5, [12]), (17, [1]), (33, [80])]
GREY = 25        # stored as an L (grey) JPEG
TRUNCATED = 61   # its JPEG lacks its last bytes
NO_CLASS = 42


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield


def _draw(label_ids: list[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image with one shape per class (class 1 red box, 12 green disc, 80 blue bar) and its GT."""
    h, w = SIZE
    img = (rng.normal(110, 12, (h, w, 3))).clip(0, 255)
    gt = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    colours = {1: (220, 40, 40), 12: (40, 200, 60), 80: (50, 70, 230)}
    for n, c in enumerate(label_ids):
        oy, ox = int(rng.integers(4, 24)), int(rng.integers(4, 24)) + 18 * n
        if c == 1:
            region = (yy >= oy) & (yy < oy + 22) & (xx >= ox) & (xx < ox + 18)
        elif c == 12:
            region = (yy - oy - 12) ** 2 + (xx - ox - 12) ** 2 < 11 ** 2
        else:
            region = (yy >= oy + 5) & (yy < oy + 14) & (xx >= ox) & (xx < min(w, ox + 34))
        img[region] = colours[c]
        gt[region] = c
    return img.astype(np.uint8), gt


def write_tiny_coco(root: Path, seed: int = 0) -> Path:
    """A prepared COCO tree: images, mask/ GT by int id, lists/ of stems, cls_labels_*.json."""
    rng = np.random.default_rng(seed)
    for split, items in (("train", TRAIN), ("val", VAL)):
        folder = f"{split}2014"
        for d in (root / folder, root / "mask" / folder, root / "lists"):
            d.mkdir(parents=True, exist_ok=True)
        labels = {}
        for image_id, ids in items:
            stem = stem_of(split, image_id)
            img, gt = _draw(ids, rng)
            path = root / folder / f"{stem}.jpg"
            if image_id == GREY:
                Image.fromarray(img.mean(2).astype(np.uint8), mode="L").save(path, quality=92)
            else:
                Image.fromarray(img).save(path, quality=92)
            if image_id == TRUNCATED:
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * 0.7)])
            Image.fromarray(gt, mode="L").save(root / "mask" / folder / f"{image_id}.png")
            labels[stem] = [c - 1 for c in ids]
        (root / "lists" / f"{folder}.txt").write_text("".join(f"{stem_of(split, i)}\n" for i, _ in items))
        save_cls_labels(root / f"cls_labels_{folder}.json", labels, COCO_CLASSES[1:])
    return root


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory) -> Path:
    return write_tiny_coco(tmp_path_factory.mktemp("coco") / "coco")


def _stems(split: str, items) -> list[str]:
    return [stem_of(split, i) for i, _ in items]


# ----------------------------------------------------------------------------- data source


def test_coco_source_ids_names_paths_and_class_count(tiny_coco):
    src = open_source("coco", tiny_coco)
    assert (src.name, src.num_classes, src.num_labels, src.gt_ignore) == ("coco", 80, 81, None)
    assert src.ids("train") == _stems("train", TRAIN) == src.ids("infer") == src.ids("eval")
    assert src.ids("val") == _stems("val", VAL)
    stem = "COCO_train2014_000000000009"
    assert src.image_path(stem) == tiny_coco / "train2014" / f"{stem}.jpg"
    assert src.gt_path(stem) == tiny_coco / "mask" / "train2014" / "9.png"  # GT by int id
    assert src.gt_path("COCO_val2014_000000000033") == tiny_coco / "mask" / "val2014" / "33.png"
    assert src.labels("COCO_train2014_000000000030") == [0, 79]
    assert src.labels(stem_of("train", NO_CLASS)) == []
    vec = src.label_vector("COCO_train2014_000000000049")
    assert vec.shape == (80,) and vec.dtype == np.float32 and np.flatnonzero(vec).tolist() == [11, 79]
    gt = src.read_gt("COCO_train2014_000000000030")
    assert gt.dtype == np.int64 and set(np.unique(gt).tolist()) == {0, 1, 80}
    grey = src.read_image(stem_of("train", GREY))
    assert grey.shape == SIZE + (3,) and np.array_equal(grey[..., 0], grey[..., 2])
    assert src.read_image(stem_of("train", TRUNCATED)).shape == SIZE + (3,)  # tolerated for COCO
    # VOC keeps its strictness for truncated files, and its own class count.
    from datasets.readers import read_image
    with pytest.raises(DataError, match="truncated"):
        read_image(src.image_path(stem_of("train", TRUNCATED)), "x")
    voc = open_source("voc", tiny_coco)
    assert (voc.num_classes, voc.num_labels, voc.gt_ignore) == (20, 21, 255)

    # Eval split val, --max_images (eval keeps the cut train ids), lists given explicitly.
    assert open_source("coco", tiny_coco, eval_set="val").ids("eval") == _stems("val", VAL)
    cut = open_source("coco", tiny_coco, max_images=3)
    assert cut.ids("train") == _stems("train", TRAIN)[:3] == cut.ids("eval")
    custom = tiny_coco.parent / "mine.txt"
    custom.write_text("COCO_val2014_000000000017\nCOCO_train2014_000000000072\n")
    mixed = open_source("coco", tiny_coco, lists={"train": custom})
    assert mixed.ids("train") == ["COCO_val2014_000000000017", "COCO_train2014_000000000072"]
    assert mixed.labels("COCO_val2014_000000000017") == [0]  # from cls_labels_val2014.json
    custom.write_text("COCO_train2014_000000000072\n2007_000032\n")
    with pytest.raises(DataError, match="2007_000032.*mine.txt"):
        mixed.ids("train")


def test_driver_options_pick_the_coco_source_and_defaults(tiny_coco, tmp_path):
    from irn import run_sample
    base = ["--work_dir", str(tmp_path / "w"), "--dataset", "coco", "--coco_root", str(tiny_coco)]
    args = run_sample.parse_args(base)
    assert (args.conf_fg_thres, args.conf_bg_thres) == (0.35, 0.10)
    assert type(args.conf_fg_thres) is float
    assert args.train_list == tiny_coco / "lists" / "train2014.txt" == args.infer_list
    assert args.val_list == tiny_coco / "lists" / "val2014.txt"
    assert args.cam_freeze_until == "stage2" and args.irn_infer_pad_to is None  # QUIRK-17 default, BECO #6
    assert args.no_class_mask == "random_half"
    src = data_source(args)
    assert isinstance(src, CocoSource) and src.ids("train") == _stems("train", TRAIN)
    # An explicit value is kept, even one equal to VOC's default.
    args = run_sample.parse_args(base + ["--conf_fg_thres", "0.30", "--conf_bg_thres", "0.05"])
    assert (args.conf_fg_thres, args.conf_bg_thres) == (0.30, 0.05)
    voc = run_sample.parse_args(["--work_dir", str(tmp_path / "v")])
    assert (voc.conf_fg_thres, voc.conf_bg_thres, voc.dataset) == (0.30, 0.05, "voc")
    assert isinstance(data_source(voc), VOCSource)
    assert "--dataset coco" in run_sample.__doc__ and "QUIRK-17" in run_sample.__doc__
    assert "QUIRK-15" in run_sample.__doc__


def test_missing_gt_and_label_files_name_the_id_and_path(tiny_coco, tmp_path):
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    src = open_source("coco", root)
    stem = "COCO_train2014_000000000025"
    (root / "mask" / "train2014" / "25.png").unlink()
    with pytest.raises(DataError, match=f"'{stem}'.*25.png"):
        src.check_gt(src.ids("train"))
    with pytest.raises(DataError, match=f"'{stem}'.*25.png"):
        src.read_gt(stem)
    labels = json.loads((root / "cls_labels_train2014.json").read_text())
    del labels["labels"]["COCO_train2014_000000000064"]
    (root / "cls_labels_train2014.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match="'COCO_train2014_000000000064'.*cls_labels_train2014.json"):
        open_source("coco", root).labels("COCO_train2014_000000000064")
    (root / "cls_labels_val2014.json").unlink()
    with pytest.raises(DataError, match="'COCO_val2014_000000000005'.*cls_labels_val2014.json"):
        open_source("coco", root).labels("COCO_val2014_000000000005")
    with pytest.raises(DataError, match="'COCO_val2014_000000000005'.*cls_labels_val2014.json"):
        ClassificationView(open_source("coco", root).ids("val"), open_source("coco", root))
    (root / "val2014" / "COCO_val2014_000000000017.jpg").unlink()
    with pytest.raises(DataError, match="'COCO_val2014_000000000017'.*COCO_val2014_000000000017.jpg"):
        ClassificationView(open_source("coco", root).ids("val"), open_source("coco", root))


def test_coco_datasets_and_networks_take_the_class_count(tiny_coco):
    from datasets.affinity import PathIndex, affinity_labels
    from irn.net.backbone import resnet
    from irn.net.resnet50_cam import CAM, Net
    src = open_source("coco", tiny_coco)
    ds = InferenceView(src.ids("train"), src, scales=(1.0, 0.5))
    item = ds[2]
    assert item["name"] == "COCO_train2014_000000000030" and item["size"] == SIZE
    assert item["label"].shape == (80,) and np.flatnonzero(item["label"].numpy()).tolist() == [0, 79]
    assert tuple(Net(backbone=resnet(18), n_classes=80).classifier.weight.shape[:2]) == (80, 512)
    assert CAM(backbone=resnet(18), n_classes=src.num_classes).num_classes == 80
    # label id 80 is a class for COCO's bound (81), unknown for VOC's (21).
    idx = PathIndex(5).indices((12, 12))
    lab = np.full((12, 12), 80, np.uint8)
    assert float(affinity_labels(lab, idx, src.num_labels)[1].sum()) > 0
    assert float(sum(t.sum() for t in affinity_labels(lab, idx, 21))) == 0


# ----------------------------------------------------------------------------- evaluation


def test_streaming_confusion_equals_one_shot():
    rng = np.random.default_rng(4)
    gts, preds = [], []
    stream = StreamingConfusion(81)
    for shape in ((5, 7), (9, 4), (6, 6)):
        gt = rng.integers(0, 81, shape)
        gt[rng.random(shape) < 0.1] = -1
        pred = rng.integers(0, 81, shape)
        stream.add(gt, pred)
        gts.append(gt.reshape(-1))
        preds.append(pred.reshape(-1))
    once = confusion_of_maps(np.concatenate(gts), np.concatenate(preds), 81, ignore=-1)
    assert stream.matrix.shape == (81, 81) and np.array_equal(stream.matrix, once) and stream.images == 3
    assert stream.scores() == seen_class_scores(once)
    conf = np.array([[5, 2, 1], [0, 3, 0], [1, 0, 4]])  # rows GT, cols prediction
    assert fg_on_gt_background(conf) == pytest.approx(3 / 10)
    assert fg_on_gt_background(np.diag([4, 0, 0])) is None


def test_eval_cam_on_coco_uses_81_classes(tiny_coco, tmp_path):
    from irn.misc.cam_io import save_cam
    from irn.step import eval_cam
    src = open_source("coco", tiny_coco)
    for stem in src.ids("train"):
        gt = src.read_gt(stem)
        keys = np.array(src.labels(stem), dtype=np.int64)
        high = np.stack([(gt == k + 1).astype(np.float32) * 0.9 for k in keys]) if keys.size else \
            np.zeros((0,) + gt.shape, np.float32)
        save_cam(tmp_path / f"{stem}.npy", keys, high[:, ::4, ::4], high)
    args = Namespace(dataset="coco", coco_root=tiny_coco, chainer_eval_set="train", max_images=None,
                     cls_labels=None, train_list=None, val_list=None, infer_list=None, cam_out_dir=tmp_path,
                     cam_eval_thres=0.15, no_progress=True, cam_eval_sweep=())
    out = eval_cam.run(args)
    assert len(out["cam_iou"]) == 81 and out["cam_miou"] == pytest.approx(1.0) and out["images"] == len(TRAIN)
    assert out["fg_on_gt_background"] == 0.0
    assert [i for i, v in enumerate(out["cam_iou"]) if v is not None] == [0, 1, 12, 80]


# ----------------------------------------------------------------------------- no-class masks (QUIRK-15)


def test_no_class_mask_is_full_size_seeded_and_optional(tmp_path):
    from datasets.handoff import no_class_mask
    from irn.step.gen_mask import generate_masks, read_mask_png
    from irn.step.make_sem_seg_labels import save_score
    a = no_class_mask((5, 7), "COCO_train2014_000000000042", seed=3, mode="random_half", thd=0.5)
    assert a.shape == (5, 7) and int(a.sum()) == 35 // 2
    assert np.array_equal(a, no_class_mask((5, 7), "COCO_train2014_000000000042", seed=3, mode="random_half", thd=0.5))
    assert not np.array_equal(a, no_class_mask((5, 7), "COCO_train2014_000000000042", seed=4, mode="random_half", thd=0.5))
    assert not np.array_equal(a, no_class_mask((5, 7), "COCO_train2014_000000000043", seed=3, mode="random_half", thd=0.5))
    assert int(no_class_mask((5, 7), "x", seed=0, mode="zero", thd=0.5).sum()) == 0
    # Through generate_masks: a background-only score file (K = 0) of the image's full size.
    h, w = 6, 9
    save_score(tmp_path / "score" / "e.pt", torch.zeros(h, w, dtype=torch.long), torch.full((1, h, w), 0.25),
               torch.tensor([0]))
    out = generate_masks(["e"], tmp_path / "score", tmp_path / "m", show_progress=False, seed=3)
    mask = read_mask_png(tmp_path / "m" / "e.png")
    assert mask.shape == (h, w) and int(mask.sum()) == h * w // 2 and out["no_class_images"] == 1
    generate_masks(["e"], tmp_path / "score", tmp_path / "z", show_progress=False, no_class="zero")
    assert int(read_mask_png(tmp_path / "z" / "e.png").sum()) == 0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_sample_coco_end_to_end(tiny_coco, tmp_path):
    from irn import run_sample
    from irn.misc.cam_io import load_cam
    from irn.step.gen_mask import load_score, read_mask_png
    work, export = tmp_path / "work", tmp_path / "export"
    argv = ["--dataset", "coco", "--coco_root", str(tiny_coco), "--work_dir", str(work), "--steps", "all",
            "--export_to", str(export), "--device", "cpu", "--num_workers", "0", "--torch_threads", "1",
            "--seed", "0", "--no_progress", "--backbone_depth", "18", "--backbone_bn", "batch",
            "--cam_freeze_until", "none", "--cam_crop_size", "48", "--cam_resize_long", "48,64",
            "--cam_batch_size", "2", "--cam_num_epoches", "2", "--cam_scales", "1.0,0.5",
            "--irn_crop_size", "48", "--irn_batch_size", "4", "--irn_num_epoches", "1", "--radius", "5",
            "--exp_times", "3", "--irn_backbone_from_cam", "true"]
    with pytest.warns(UserWarning, match="NO IMAGENET WEIGHTS"):
        res = run_sample.main(argv)
    stems = _stems("train", TRAIN)
    labels = {stem_of("train", i): [c - 1 for c in ids] for i, ids in TRAIN}

    # Every output named by file stem.
    for folder, suffix in (("result/cam", ".npy"), ("result/ir_label", ".png"), ("result/sem_seg", ".png"),
                           ("result/score", ".pt"), ("result/mask_irn", ".png"), ("../export/irn_pseudo_label", ".png"),
                           ("../export/irn_mask", ".png")):
        names = sorted(p.name for p in (work / folder).iterdir() if not p.name.startswith((".", "_provenance")))
        assert names == sorted(f"{s}{suffix}" for s in stems), folder

    state = torch.load(work / "sess" / "res18_cam.pth", weights_only=True)
    assert tuple(state["classifier.weight"].shape[:2]) == (80, 512)  # 80-class CAM
    assert math.isfinite(res["train_cam"]["final_val_loss"])  # on val2014
    summary = json.loads((work / "summary.json").read_text())
    assert summary["config"]["conf_fg_thres"] == 0.35 and summary["config"]["conf_bg_thres"] == 0.10

    for stem in stems:
        keys = labels[stem]
        cam = load_cam(work / "result" / "cam" / f"{stem}.npy")
        assert cam["keys"].tolist() == keys
        assert cam["high_res"].shape == (len(keys),) + SIZE and cam["cam"].shape == (len(keys), 16, 16)
        ir = np.asarray(Image.open(work / "result" / "ir_label" / f"{stem}.png"))
        sem = np.asarray(Image.open(work / "result" / "sem_seg" / f"{stem}.png"))
        assert ir.shape == sem.shape == SIZE
        assert set(np.unique(ir).tolist()) <= {0, 255} | {k + 1 for k in keys}
        assert set(np.unique(sem).tolist()) <= {0} | {k + 1 for k in keys} and sem.max() <= 80
        mask = np.asarray(Image.open(work / "result" / "mask_irn" / f"{stem}.png"))
        assert mask.shape == SIZE + (3,) and set(np.unique(mask).tolist()) <= {0, 255}
        score = load_score(work / "result" / "score" / f"{stem}.pt")
        assert tuple(score["score"].shape) == (len(keys) + 1,) + SIZE

    # The image without a class: empty CAM stacks, all-zero labels, a full-size half mask.
    empty = stem_of("train", NO_CLASS)
    assert int(np.asarray(Image.open(work / "result" / "ir_label" / f"{empty}.png")).max()) == 0
    assert int(np.asarray(Image.open(work / "result" / "sem_seg" / f"{empty}.png")).max()) == 0
    mask0 = read_mask_png(work / "result" / "mask_irn" / f"{empty}.png")
    assert mask0.shape == SIZE and int(mask0.sum()) == SIZE[0] * SIZE[1] // 2
    assert res["gen_mask"]["no_class_images"] == 1

    # Evaluation with 81 classes over all train2014 images, GT by int id.
    assert len(res["eval_cam"]["cam_iou"]) == 81 and res["eval_cam"]["images"] == len(TRAIN)
    assert len(res["eval_sem_seg"]["sem_seg_iou"]) == 81 and res["eval_sem_seg"]["images"] == len(TRAIN)
    assert 0.0 <= res["eval_cam"]["cam_miou"] <= 1.0 and 0.0 <= res["eval_cam"]["fg_on_gt_background"] <= 1.0
    assert res["cam_to_ir_label"]["seed_eval_images"] == len(TRAIN)

    # Reruns of gen_mask: the same seed gives the same no-class mask, another seed another one
    # (the masks of images with classes do not depend on the seed).
    rerun = argv[argv.index("--device"):] + ["--dataset", "coco", "--coco_root", str(tiny_coco),
                                             "--work_dir", str(work), "--steps", "gen_mask", "--overwrite"]
    run_sample.main(rerun)
    assert np.array_equal(read_mask_png(work / "result" / "mask_irn" / f"{empty}.png"), mask0)
    other = read_mask_png(work / "result" / "mask_irn" / f"{stems[0]}.png")
    run_sample.main(rerun + ["--seed", "1"])
    mask1 = read_mask_png(work / "result" / "mask_irn" / f"{empty}.png")
    assert int(mask1.sum()) == int(mask0.sum()) and not np.array_equal(mask1, mask0)
    assert np.array_equal(read_mask_png(work / "result" / "mask_irn" / f"{stems[0]}.png"), other)
    run_sample.main(rerun + ["--no_class_mask", "zero"])
    assert int(read_mask_png(work / "result" / "mask_irn" / f"{empty}.png").sum()) == 0

    # Sharded over processes (2 CPU shards for make_cam / make_sem_seg, 2 CRF processes): same outputs.
    sharded = tmp_path / "sharded"
    for d in ("sess", "result/cam", "result/ir_label", "result/sem_seg", "result/score"):
        (sharded / d).mkdir(parents=True)
    for name in ("res18_cam.pth", "res18_irn.pth"):
        (sharded / "sess" / name).write_bytes((work / "sess" / name).read_bytes())
    run_sample.main(argv[argv.index("--device"):] + [
        "--dataset", "coco", "--coco_root", str(tiny_coco), "--work_dir", str(sharded),
        "--steps", "make_cam,cam_to_ir_label,make_sem_seg", "--cpu_shards", "2", "--num_workers", "2"])
    for stem in stems:
        a, b = load_cam(work / "result/cam" / f"{stem}.npy"), load_cam(sharded / "result/cam" / f"{stem}.npy")
        assert np.array_equal(a["keys"], b["keys"]) and np.allclose(a["high_res"], b["high_res"], atol=1e-6)
        for d in ("ir_label", "sem_seg"):
            assert np.array_equal(np.asarray(Image.open(work / "result" / d / f"{stem}.png")),
                                  np.asarray(Image.open(sharded / "result" / d / f"{stem}.png"))), (d, stem)

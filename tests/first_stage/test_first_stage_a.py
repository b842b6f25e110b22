"""First stage, part A: data preparation, data helpers, backbone, CAM steps, and their spec §21 oracles."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.synthetic.voc import make_synthetic_voc
from datasets.prepare.cls_labels import (ClassLabels, LabelError, classes_in_xml, load_cls_labels,
                                     multi_hot)
from irn.misc.cam_io import load_cam, save_cam
from irn.misc.settings import config_path, load_settings
from models.checkpoint import CheckpointMismatchError
from models.resnet import FixedBatchNorm2d
from irn.net.backbone import backbone_filter, build_backbone, checkpoint_filter_fn, file_state, resnet
from irn.net.resnet50_cam import CAM, Net, load_cam_weights
from irn.step.cam_to_ir_label import combine, crf_params
from irn.step.eval_cam import cam_prediction
from irn.step.make_cam import cams_for_image, normalise_channels, stride4_size, strided_up_size
from datasets import transforms as T
from datasets.readers import DataError
from datasets.views import ClassificationView, SegmentationView, open_source
from utils.crf import hard_label_crf, hard_label_unary
from utils.metrics import confusion_of_maps, seen_class_scores
from utils.schedule import PolyOptimizer, max_steps, poly_factor

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield


def _no_weights_warning():
    return pytest.warns(UserWarning, match="NO IMAGENET WEIGHTS")


# ----------------------------------------------------------------------------- sizes (oracles 5, 6)


def test_oracle5_sizes():
    assert stride4_size(375, 500) == (94, 125)
    assert strided_up_size(375, 500) == (384, 512)
    assert stride4_size(333, 500) == (84, 125)
    assert strided_up_size(333, 500) == (336, 512)
    img = np.zeros((375, 500, 3), np.uint8)
    sizes = [T.rescale(img, s, 3).shape[:2] for s in (1.0, 0.5, 1.5, 2.0)]
    assert sizes == [(375, 500), (188, 250), (562, 750), (750, 1000)]
    # CAM map sizes, by running the backbone on the meta device (shapes only, no compute).
    with _no_weights_warning():
        net = build_backbone(18).to("meta")
    cams = [tuple(net(torch.empty(1, 3, h, w, device="meta"))["layer4"].shape[2:]) for h, w in sizes]
    assert cams == [(24, 32), (12, 16), (36, 47), (47, 63)]


def test_oracle6_cam_network_shapes_and_backbone_layout():
    with _no_weights_warning():
        net = Net(depth=50).to("meta")
    x = torch.empty(2, 3, 512, 512, device="meta")
    assert tuple(net.features(x).shape) == (2, 2048, 32, 32)
    assert tuple(net(x).shape) == (2, 20)
    b = net.backbone
    assert b.stem_layer.out_channels == 64
    assert b.out_channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert tuple(b.layer4[0].conv2.stride) == (1, 1) and tuple(b.layer4[0].downsample[0].stride) == (1, 1)
    assert all(m.dilation == (1, 1) for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    assert not b.stem_layer.conv1.weight.requires_grad and not b.stem_layer.bn1.weight.requires_grad
    assert b.layer3[0].conv1.weight.requires_grad
    with _no_weights_warning():
        small = build_backbone(18)
    assert small.stem_layer.out_channels == 64
    assert small.out_channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def test_fixed_batchnorm_never_updates_and_ignores_train_flag():
    bn = FixedBatchNorm2d(3)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    x = torch.randn(4, 3, 5, 5)
    bn.train()
    y_train = bn(x)
    bn.eval()
    y_eval = bn(x)
    assert torch.equal(y_train, y_eval)
    assert torch.allclose(y_eval, (x - 1.0) / torch.sqrt(torch.tensor(4.0 + 1e-5)))
    assert torch.all(bn.running_mean == 1.0) and torch.all(bn.running_var == 4.0)


def test_bn_mode_batch_is_an_ordinary_batchnorm():
    with _no_weights_warning():
        net = build_backbone(18, bn_mode="batch")
    bn = net.layer1[0].bn1
    assert type(bn) is torch.nn.BatchNorm2d
    x = torch.randn(2, 3, 32, 32)
    net.train()
    net(x)
    assert not torch.all(bn.running_mean == 0)  # statistics updated from the batch
    fixed = resnet(18, "fixed").train()
    before = fixed.layer1[0].bn1.running_mean.clone()
    fixed(x)
    assert torch.equal(fixed.layer1[0].bn1.running_mean, before)
    with pytest.raises(ValueError):
        resnet(18, "frozen")


def test_backbone_loads_torchvision_file_strictly(tmp_path):
    import torchvision
    tv = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    state = tv.state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)  # 2017-style file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a weights file must not warn
        net = build_backbone(18, path)
    assert torch.equal(net.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(net.stem_layer.bn1.running_var, tv.bn1.running_var)
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.1.")}, bad)
    with pytest.raises(CheckpointMismatchError, match=r"bad\.pth .*missing keys 10: \[layer4\.1\.bn1\.bias"):
        build_backbone(18, bad)
    with pytest.raises(FileNotFoundError, match=r"^config key 'backbone_weights': no file .*nope\.pth"):
        build_backbone(18, tmp_path / "nope.pth")


def test_weights_files_keep_their_names_and_load_either_way(tmp_path):
    """sess/res*_cam.pth keeps torchvision's stem names under backbone. (users' existing files
    load); a file with the network's own names loads too; IRN's backbone reads a CAM file."""
    torch.manual_seed(0)
    cam = Net(backbone=resnet(18), n_classes=3)
    state = file_state(cam)
    assert [k for k in state if "conv1" in k][:2] == ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight"]
    assert "backbone.bn1.running_var" in state and not any("stem_layer" in k for k in state)
    assert torch.equal(state["backbone.conv1.weight"], cam.backbone.stem_layer.conv1.weight)
    assert list(checkpoint_filter_fn(state)) == list(cam.state_dict())
    assert checkpoint_filter_fn(cam.state_dict()).keys() == cam.state_dict().keys()
    assert list(backbone_filter(state)) == list(cam.backbone.state_dict())
    state["backbone.bn1.num_batches_tracked"] = torch.tensor(6)  # trained with --backbone_bn batch
    for name, written in (("file_names", state), ("model_names", cam.state_dict())):
        torch.save(written, tmp_path / f"{name}.pth")
        loaded = file_state(load_cam_weights(CAM(backbone=resnet(18), n_classes=3), tmp_path / f"{name}.pth"))
        assert all(torch.equal(loaded[k], v) for k, v in file_state(cam).items() if not k.endswith("_tracked"))
        assert int(loaded["backbone.bn1.num_batches_tracked"]) == (6 if name == "file_names" else 0)
    with pytest.raises(CheckpointMismatchError, match=r"classifier\.weight: checkpoint \(3, 512, 1, 1\) vs model \(4,"):
        load_cam_weights(CAM(backbone=resnet(18), n_classes=4), tmp_path / "file_names.pth")


# ----------------------------------------------------------------------------- CAM files (oracle 7, QUIRK-10)


def test_oracle7_normalisation():
    m = 3.25
    cam = torch.zeros(3, 4, 5)
    cam[0, 1, 2] = m
    cam[0, 0, 0] = 1.0
    cam[2] = torch.rand(4, 5) * 7 + 0.1
    out = normalise_channels(cam)
    assert float(out[0].max()) == float(torch.tensor(m) / (torch.tensor(m) + 1e-5))
    assert float(out[0].max()) < 1.0 and float(out[1].abs().max()) == 0.0
    assert float(out.min()) >= 0.0 and float(out.max()) < 1.0


class _StubCAM(torch.nn.Module):
    """Returns per-class maps of size ceil(h/16) × ceil(w/16) like the CAM network."""

    def forward(self, x):
        h, w = -(-x.shape[2] // 16), -(-x.shape[3] // 16)
        g = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
        return torch.cat([g * (c + 1) for c in range(20)]) * (x.shape[2] / 100.0)


def test_oracle7_cam_dict_shapes_values_and_file_forms(tmp_path):
    h, w = 45, 61
    inputs = [torch.zeros(2, 3, round(h * s), round(w * s)) for s in (1.0, 0.5)]
    label = torch.from_numpy(multi_hot([2, 7, 13]))
    res = cams_for_image(_StubCAM(), inputs, (h, w), label, torch.device("cpu"))
    assert res["keys"].tolist() == [2, 7, 13] and res["keys"].dtype == np.int64
    assert res["cam"].shape == (3, 12, 16) and res["high_res"].shape == (3, h, w)
    for k in ("cam", "high_res"):
        assert res[k].dtype == np.float32 and res[k].min() >= 0 and res[k].max() < 1
    save_cam(tmp_path / "a.npy", res["keys"], res["cam"], res["high_res"])
    back = load_cam(tmp_path / "a.npy")
    assert np.array_equal(back["cam"], res["cam"]) and np.array_equal(back["keys"], res["keys"])
    # The reference's form: torch tensors inside the pickled dict.
    np.save(tmp_path / "b.npy", {"keys": torch.tensor([2, 7, 13]), "cam": torch.from_numpy(res["cam"]),
                                 "high_res": res["high_res"]})
    ref = load_cam(tmp_path / "b.npy")
    assert isinstance(ref["cam"], np.ndarray) and np.array_equal(ref["cam"], res["cam"])
    assert ref["keys"].dtype == np.int64
    with pytest.raises(ValueError, match="'2007_000009'"):
        load_cam(tmp_path / "2007_000009.npy")


# ----------------------------------------------------------------------------- CRF (oracles 14, 15)


@pytest.mark.parametrize("n,other", [(2, 1.203973), (3, 1.897120), (4, 2.302585)])
def test_oracle14_unary_energies(n, other):
    labels = np.arange(n).reshape(1, n)
    u = hard_label_unary(labels, n, 0.7)
    assert u.shape == (n, n) and u.dtype == np.float32
    assert np.allclose(np.diag(u), 0.356675, atol=1e-6)
    assert np.allclose(u[~np.eye(n, dtype=bool)], other, atol=1e-6)
    from pydensecrf.utils import unary_from_labels
    assert np.array_equal(u, unary_from_labels(labels, n, 0.7, zero_unsure=False))


def test_oracle15_combination_table():
    fg = np.array([3, 3, 0, 0, 5])
    bg = np.array([0, 3, 0, 3, 5])
    assert combine(fg, bg).tolist() == [3, 3, 0, 255, 5]


def test_crf_keeps_a_clean_labelling():
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 200
    labels = np.zeros((20, 30), np.int64)
    labels[:, 15:] = 1
    crf = crf_params(load_settings(config_path("voc")))  # the reference's crf_* settings
    assert (crf.gt_prob, crf.iterations) == (0.7, 10)
    assert np.array_equal(hard_label_crf(img, labels, 2, crf), labels)


# ----------------------------------------------------------------------------- schedule (oracles 18, 19)


def test_oracle18_step_counts():
    assert 10582 // 16 == 661 and max_steps(10582, 16, 5) == 3305
    assert 10582 // 32 == 330 and max_steps(10582, 32, 3) == 990
    assert max_steps(82783, 16, 5) == 25865
    assert max_steps(82783, 32, 3) == 7758


def test_oracle19_poly_lr_groups_and_quirk20_momentum():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = PolyOptimizer([{"params": [a, frozen], "lr_mult": 1.0}, {"params": [b], "lr_mult": 10.0}],
                        lr=0.1, weight_decay=1e-4, max_step=4, momentum=1e-4, power=0.9)
    assert all(g["momentum"] == 1e-4 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    seen = []
    for k in range(6):
        (a.sum() + b.sum()).backward()
        opt.step()
        opt.zero_grad()
        seen.append([g["lr"] for g in opt.param_groups])
    for k in range(4):
        want = 0.1 * (1 - k / 4) ** 0.9
        assert seen[k][0] == pytest.approx(want, rel=1e-12) and seen[k][1] == pytest.approx(10 * want, rel=1e-12)
        assert 0.1 * poly_factor(k, 4, 0.9) == pytest.approx(want)
    assert seen[0] == [0.1, 1.0]
    assert seen[4] == seen[5] == seen[3]  # past max_step the lr stays put
    assert torch.equal(frozen.data, torch.ones(3))  # no grad → no weight decay either


# ----------------------------------------------------------------------------- evaluation (oracles 20, 21)


def test_oracle20_confusion_and_miou():
    gt = np.array([[0, 1], [-1, 1]])
    pred = np.array([[0, 1], [1, 0]])
    conf = confusion_of_maps(gt, pred, 2, ignore=-1)
    assert conf.tolist() == [[1, 0], [1, 1]]
    s = seen_class_scores(conf)
    assert s["iou"] == [0.5, 0.5] and s["miou"] == 0.5
    # classes absent from both GT and prediction do not count (nan-mean)
    assert seen_class_scores(confusion_of_maps(gt, pred, 5, ignore=-1))["miou"] == 0.5


def test_oracle21_eval_cam_threshold_tie_is_background():
    high_res = np.array([[[0.15, 0.1499, 0.1501]]], dtype=np.float32)
    keys = np.array([6])
    pred = cam_prediction(high_res, keys, np.float32(0.15))
    assert pred.tolist() == [[0, 0, 7]]
    two = np.array([[[0.4]], [[0.4]]], dtype=np.float32)  # tie between classes → lower channel
    assert cam_prediction(two, np.array([2, 9]), 0.15).tolist() == [[3]]


# ----------------------------------------------------------------------------- data helpers (oracles 22–24)


def test_oracle22_rescale_rounding():
    assert T.rescale(np.zeros((375, 4), np.uint8), 0.5, 0).shape[0] == 188
    assert T.rescale(np.zeros((375, 4), np.uint8), 1.5, 0).shape[0] == 562
    assert T.rescale(np.zeros((4, 500), np.uint8), 0.25, 0).shape[1] == 125


def test_oracle23_random_crop_placement():
    rng = np.random.default_rng(0)
    img = np.full((300, 400, 3), 7.0, np.float32)
    lab = np.full((300, 400), 3, np.uint8)
    tops, lefts = set(), set()
    for _ in range(400):
        ct, cb, cl, cr, it, ib, il, ir = T.random_crop_box(300, 400, 512, rng)
        assert (it, il, ib - it, ir - il) == (0, 0, 300, 400)
        assert 0 <= ct <= 212 and 0 <= cl <= 112 and cb - ct == 300 and cr - cl == 400
        tops.add(ct)
        lefts.add(cl)
    assert min(tops) <= 5 and max(tops) >= 207 and min(lefts) <= 3 and max(lefts) >= 109
    ci, cl_ = T.random_crop((img, lab), 512, (0, 255), np.random.default_rng(1))
    assert ci.shape == (512, 512, 3) and cl_.shape == (512, 512)
    assert (ci == 7).sum() == 300 * 400 * 3 and (ci == 0).sum() == (512 * 512 - 300 * 400) * 3
    assert (cl_ == 3).sum() == 300 * 400 and (cl_ == 255).sum() == 512 * 512 - 300 * 400
    assert np.array_equal(ci[..., 0] == 7, cl_ == 3)  # one shared box
    # a larger input: image offset random, container offset 0
    big = np.arange(600 * 700, dtype=np.int64).reshape(600, 700)
    ct, cb, cl, cr, it, ib, il, ir = T.random_crop_box(600, 700, 512, rng)
    assert (ct, cl, cb, cr) == (0, 0, 512, 512) and 0 <= it <= 88 and 0 <= il <= 188
    out = T.random_crop(big, 512, 0, np.random.default_rng(2))
    assert out.shape == (512, 512) and np.all(np.diff(out[0]) == 1)


def test_oracle24_nearest_reduction_picks_4i_plus_2():
    y, x = np.mgrid[0:512, 0:512]
    lab = (x // 2).astype(np.uint8)
    red = T.rescale(lab, 0.25, 0)
    assert red.shape == (128, 128)
    assert red[0].tolist() == [(4 * i + 2) // 2 for i in range(128)]
    red_y = T.rescale((y // 2).astype(np.uint8), 0.25, 0)
    assert red_y[:, 0].tolist() == [(4 * i + 2) // 2 for i in range(128)]


def test_geometric_helpers():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    # random_resize_long: long side in range; a square image scales by W
    for _ in range(20):
        out = T.random_resize_long(img, 32, 48, rng)
        assert 32 <= out.shape[1] <= 48
    sq = T.random_resize_long(np.zeros((10, 10, 3), np.uint8), 20, 20, rng)
    assert sq.shape[:2] == (20, 20)
    # shared flip decision
    lab = np.arange(30 * 40).reshape(30, 40) % 251
    flips = set()
    for _ in range(30):
        a, b = T.random_lr_flip((img, lab.astype(np.uint8)), rng)
        f = not np.array_equal(a, img)
        assert np.array_equal(b, np.fliplr(lab).astype(np.uint8) if f else lab.astype(np.uint8))
        flips.add(f)
    assert flips == {True, False}
    # random_scale: one s for both, orders bicubic / nearest
    a, b = T.random_scale((img, lab.astype(np.uint8)), (0.5, 1.5), (3, 0), np.random.default_rng(3))
    assert a.shape[:2] == b.shape[:2] and set(np.unique(b)) <= set(np.unique(lab))
    # top-left crop
    t = T.top_left_crop(np.ones((3, 70), np.float32), 64, 0)
    assert t.shape == (64, 64) and t[:3].all() and not t[3:].any()
    # normalisation and CHW
    n = T.TorchvisionNormalize()(np.full((1, 1, 3), 255, np.uint8))
    assert np.allclose(n[0, 0], (1 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD))
    assert T.hwc_to_chw(np.zeros((4, 5, 3))).shape == (3, 4, 5)
    # MSF pairs
    ms = T.msf_inputs(img, (1.0, 0.5))
    assert ms[0].shape == (2, 3, 30, 40) and ms[1].shape == (2, 3, 15, 20)
    assert np.array_equal(ms[0][1], ms[0][0][..., ::-1])


# ----------------------------------------------------------------------------- labels and data preparation


def test_xml_labels(tmp_path):
    xml = tmp_path / "x.xml"
    xml.write_text("<annotation><object><name>person</name><difficult>1</difficult></object>"
                   "<object><name>aeroplane</name><truncated>1</truncated></object>"
                   "<object><name>person</name></object></annotation>")
    assert classes_in_xml(xml) == [0, 14]
    xml.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(LabelError, match="unicorn"):
        classes_in_xml(xml, "2007_000001")
    with pytest.raises(LabelError, match="'2007_000002'"):
        classes_in_xml(tmp_path / "missing.xml", "2007_000002")


@pytest.fixture(scope="module")
def synthetic_voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    make_synthetic_voc(root, train=8, val=2, test=4, size=(48, 64), classes=3, seed=3)
    return root


def _sbd_mat(path: Path, seg: np.ndarray) -> None:
    from scipy.io import savemat
    savemat(str(path), {"GTcls": {"Segmentation": seg, "Boundaries": np.empty((1, 0), dtype=object),
                                  "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}})


def test_prepare_voc_aug_on_tiny_sbd_tree(tmp_path, synthetic_voc):
    import shutil
    from tools.prepare_voc_aug import main as prepare_main
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(synthetic_voc / "VOC2012", voc)
    shutil.rmtree(voc / "SegmentationClassAug")
    (voc / "ImageSets/Segmentation/train_aug.txt").unlink()
    lists = voc / "ImageSets/Segmentation"
    voc_train = lists.joinpath("train.txt").read_text().split()
    voc_val = lists.joinpath("val.txt").read_text().split()
    test_ids = lists.joinpath("test.txt").read_text().split()  # images + XML, no VOC labels: SBD-only ids
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    sbd_train = [test_ids[2], test_ids[0], voc_train[0]]
    sbd_val = [test_ids[1], voc_val[0]]
    rng = np.random.default_rng(0)
    segs = {}
    for i in sbd_train + sbd_val:
        seg = rng.integers(0, 4, (48, 64)).astype(np.uint8)
        segs[i] = seg
        _sbd_mat(sbd / "cls" / f"{i}.mat", seg)
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")

    assert prepare_main(["--voc", str(tmp_path / "VOCdevkit"), "--sbd", str(tmp_path / "benchmark_RELEASE"),
                         "--quiet"]) == 0
    aug = lists.joinpath("train_aug.txt").read_text().split()
    assert aug == sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
    assert voc_val[0] not in aug and test_ids[1] in aug and test_ids[3] not in aug
    out = voc / "SegmentationClassAug"
    for i in test_ids[:3]:  # SBD-only: the .mat content
        assert np.array_equal(np.asarray(Image.open(out / f"{i}.png")), segs[i])
    voc_gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{voc_train[0]}.png"))
    assert np.array_equal(np.asarray(Image.open(out / f"{voc_train[0]}.png")), voc_gt)  # VOC's labels win
    assert (out / f"{voc_val[0]}.png").is_file()  # VOC labels are all copied in
    labels = load_cls_labels(voc / "cls_labels.json")
    assert set(labels) == set(aug) | set(voc_train) | set(voc_val)
    for i in labels:
        assert labels[i] == classes_in_xml(voc / "Annotations" / f"{i}.xml")
    # the reader used by the first stage: file first, XML fallback, same vectors
    file_labels, xml_labels = ClassLabels(voc), ClassLabels(synthetic_voc / "VOC2012")
    assert file_labels.source.endswith("cls_labels.json")
    for i in aug:
        assert np.array_equal(file_labels.vector(i), xml_labels.vector(i))
    # rerun keeps files; a missing .mat is an error naming it
    assert prepare_main(["--voc", str(voc), "--sbd", str(sbd), "--quiet"]) == 0
    (sbd / "cls" / f"{test_ids[0]}.mat").unlink()
    (out / f"{test_ids[0]}.png").unlink()
    with pytest.raises(Exception, match=test_ids[0]):
        from tools.prepare_voc_aug import prepare
        prepare(voc, sbd, progress=False)


def test_synthetic_labels_match_ground_truth(synthetic_voc):
    labels = ClassLabels(synthetic_voc / "VOC2012")
    for i in (synthetic_voc / "VOC2012/ImageSets/Segmentation/train.txt").read_text().split():
        gt = np.asarray(Image.open(synthetic_voc / "VOC2012/SegmentationClass" / f"{i}.png"))
        present = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
        # every class visible in the GT is in the label (an object may be fully hidden/void)
        assert set(present) <= set(labels.indices(i))


def test_segmentation_dataset_item(synthetic_voc):
    root = synthetic_voc / "VOC2012"
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    ds = SegmentationView(ids, root / "SegmentationClassAug", 40, open_source("voc", root), rescale=(0.5, 1.5),
                          hor_flip=True, crop_method="random")
    item = ds[0]
    assert item["img"].shape == (3, 40, 40) and item["img"].dtype == np.float32
    assert item["label"].shape == (40, 40) and item["label"].dtype == np.uint8
    with pytest.raises(DataError, match="'nope'"):
        SegmentationView(["nope"], root / "SegmentationClassAug", 40, open_source("voc", root))


# ----------------------------------------------------------------------------- smoke run through the driver


@pytest.mark.slow
def test_driver_smoke_cam_steps(tmp_path, synthetic_voc):
    work = tmp_path / "work"
    cmd = [sys.executable, str(IRN / "run_sample.py"), "--voc12_root", str(synthetic_voc / "VOC2012"),
           "--work_dir", str(work), "--steps", "train_cam,make_cam,eval_cam,cam_to_ir_label",
           "--backbone_depth", "18", "--cam_crop_size", "48", "--cam_resize_long", "40,64",
           "--cam_batch_size", "4", "--cam_num_epoches", "1", "--cam_scales", "1.0,0.5",
           "--num_workers", "2", "--max_images", "6", "--seed", "1", "--no_progress", "--device", "cpu",
           "--torch_threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "NO IMAGENET WEIGHTS" in r.stderr or "FROM SCRATCH" in r.stdout
    for d in ("sess", "result/cam", "result/ir_label", "result/sem_seg", "result/score", "result/mask_irn", "logs"):
        assert (work / d).is_dir()
    ids = (synthetic_voc / "VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split()[:6]
    labels = ClassLabels(synthetic_voc / "VOC2012")
    for i in ids:
        cam = load_cam(work / "result/cam" / f"{i}.npy")
        assert cam["keys"].tolist() == labels.indices(i)
        assert cam["high_res"].shape == (len(cam["keys"]), 48, 64) and cam["cam"].shape[1:] == (12, 16)
        ir = np.asarray(Image.open(work / "result/ir_label" / f"{i}.png"))
        assert ir.shape == (48, 64) and ir.dtype == np.uint8
        assert set(np.unique(ir).tolist()) <= {0, 255} | {int(k) + 1 for k in cam["keys"]}
    summary = json.loads((work / "summary.json").read_text())
    steps = summary["steps"]
    assert set(steps) == {"train_cam", "make_cam", "eval_cam", "cam_to_ir_label"}
    assert 0.0 <= steps["eval_cam"]["metrics"]["cam_miou"] <= 1.0
    assert steps["make_cam"]["metrics"]["written"] == 6 and steps["eval_cam"]["seconds"] >= 0

    # rerun: everything is skipped, summary merged, log appended
    r2 = subprocess.run(cmd[:cmd.index("--steps") + 1] + ["train_cam,make_cam,cam_to_ir_label"] + cmd[cmd.index("--steps") + 2:],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr[-3000:]
    s2 = json.loads((work / "summary.json").read_text())["steps"]
    assert s2["make_cam"]["metrics"]["written"] == 0 and s2["cam_to_ir_label"]["metrics"]["written"] == 0
    assert "eval_cam" in s2
    assert s2["train_cam"]["metrics"] == steps["train_cam"]["metrics"] and "last_skipped" in s2["train_cam"]
    assert (work / "log.txt").read_text().count("== make_cam done") == 2


def test_driver_options_and_step_order(tmp_path):
    from irn import run_sample as rs
    p = rs.build_parser()
    a = rs.parse_args(["--work_dir", str(tmp_path)])  # configs/first_stage/voc.yaml
    assert (a.cam_batch_size, a.cam_num_epoches, a.cam_learning_rate, a.cam_weight_decay) == (16, 5, 0.1, 1e-4)
    assert (a.cam_eval_thres, a.conf_fg_thres, a.conf_bg_thres, a.cam_scales) == (0.15, 0.30, 0.05, (1.0, 0.5, 1.5, 2.0))
    assert (a.irn_crop_size, a.irn_batch_size, a.irn_num_epoches, a.irn_learning_rate, a.irn_weight_decay) == \
        (512, 32, 3, 0.1, 1e-4)
    assert (a.sgd_momentum, a.poly_power, a.beta, a.exp_times, a.sem_seg_bg_thres) == (1e-4, 0.9, 10, 8, 0.25)
    assert (a.rw_mode, a.rw_allow_tf32, a.irn_infer_pad_to, a.margin_tie_mode, a.mask_thd) == \
        ("sparse", False, None, "original", 0.5)
    assert (a.radius, a.rw_radius, a.backbone_depth, a.backbone_weights) == (10, 5, 50, None)
    assert p.parse_args(["--steps", "eval_cam,train_cam"]).steps == ["train_cam", "eval_cam"]
    assert p.parse_args(["--steps", "all"]).steps == list(rs.STEPS)
    assert p.parse_args(["--rw_allow_tf32", "False"]).rw_allow_tf32 is False  # QUIRK-6 fixed
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "train_cam,bogus"])


def test_eval_cam_perfect_cams_give_miou_one(tmp_path, synthetic_voc):
    """CAMs equal to the one-hot GT (void → background) are scored 1.0: keys map to ids k+1."""
    from argparse import Namespace
    from irn.step import eval_cam
    root = synthetic_voc / "VOC2012"
    cam_dir = tmp_path / "cam"
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    labels = ClassLabels(root)
    for i in ids:
        gt = np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png"))
        keys = np.array(labels.indices(i), dtype=np.int64)
        high = np.stack([(gt == k + 1).astype(np.float32) * 0.9 for k in keys]) if keys.size else \
            np.zeros((0,) + gt.shape, np.float32)
        save_cam(cam_dir / f"{i}.npy", keys, high[:, ::4, ::4], high)
    args = Namespace(dataset="voc", voc12_root=root, chainer_eval_set="train", max_images=None, cls_labels=None,
                     train_list=None, val_list=None, infer_list=None, cam_out_dir=cam_dir,
                     cam_eval_thres=0.15, no_progress=True, cam_eval_sweep=(0.5, 0.95))
    out = eval_cam.run(args)
    assert out["cam_miou"] == pytest.approx(1.0) and out["images"] == len(ids)
    assert out["cam_miou_sweep"]["0.5"] == pytest.approx(1.0) and out["cam_miou_sweep"]["0.95"] < 0.5
    args.cam_eval_thres = 0.95  # everything background now
    out = eval_cam.run(args)
    assert out["cam_iou"][1:] == [0.0 if v is not None else None for v in out["cam_iou"][1:]]


def test_pseudo_labels_compared_with_cams():
    from irn.step.eval_sem_seg import compare_with_cams
    cam = {"images": 10, "cam_miou": 0.40, "cam_eval_thres": 0.15, "cam_miou_sweep": {"0.3": 0.50, "0.4": 0.55}}
    gains = compare_with_cams(0.62, 10, cam)
    assert gains["gain_over_cam"] == pytest.approx(0.22) and gains["best_cam_thres"] == 0.4
    assert gains["gain_over_best_cam"] == pytest.approx(0.07)
    assert set(compare_with_cams(0.62, 10, {**cam, "cam_miou_sweep": {}})) == {"gain_over_cam"}
    # CAMs scored on other images, or none recorded: nothing to compare.
    assert compare_with_cams(0.62, 9, cam) == {} and compare_with_cams(0.62, 10, None) == {}


def test_eval_sem_seg_warns_when_cams_win(tmp_path, synthetic_voc, caplog):
    """All-background labels against a recorded eval_cam: the gains are negative and logged as a warning."""
    import json
    import logging
    from argparse import Namespace
    from irn.step import eval_sem_seg
    root = synthetic_voc / "VOC2012"
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    for i in ids:
        gt = np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png"))
        (tmp_path / "sem").mkdir(exist_ok=True)
        Image.fromarray(np.zeros_like(gt)).save(tmp_path / "sem" / f"{i}.png")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"steps": {"eval_cam": {"metrics": {
        "images": len(ids), "cam_miou": 0.3, "cam_eval_thres": 0.15, "cam_miou_sweep": {"0.4": 0.6}}}}}))
    args = Namespace(dataset="voc", voc12_root=root, chainer_eval_set="train", max_images=None, cls_labels=None,
                     train_list=None, val_list=None, infer_list=None, sem_seg_out_dir=tmp_path / "sem",
                     no_progress=True, summary_path=summary)
    with caplog.at_level(logging.INFO):
        out = eval_sem_seg.run(args)
    assert out["gain_over_cam"] == pytest.approx(out["sem_seg_miou"] - 0.3)
    assert out["gain_over_best_cam"] == pytest.approx(out["sem_seg_miou"] - 0.6) and out["gain_over_best_cam"] < 0
    assert any(r.levelno == logging.WARNING and "does not beat thresholded CAMs" in r.getMessage()
               for r in caplog.records)


def test_seeded_loader_is_reproducible(synthetic_voc):
    from torch.utils.data import DataLoader
    from utils.runtime import seeded_loader_kwargs, set_seed
    root = synthetic_voc / "VOC2012"

    def batches():
        set_seed(5)
        ds = ClassificationView(root / "ImageSets/Segmentation/train_aug.txt", open_source("voc", root),
                                resize_long=(40, 80), hor_flip=True, crop_size=32, crop_method="random")
        loader = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True, **seeded_loader_kwargs(5, 0))
        return [(b["name"], b["img"]) for b in loader]

    a, b = batches(), batches()
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))

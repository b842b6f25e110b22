"""First stage, IRN half: path index, affinity labels, IRN, random walk, score files, gen_mask.

Spec oracles (first-stage §21): path index 1–4, affinity labels 8, affinity / random walk
9–13, gen_mask 16–17; plus dense-vs-sparse random walk equality, score-file round trips
(ours and the reference's layout), the mask format as the second stage reads it, and a
smoke run of train_irn → make_sem_seg → eval_sem_seg → gen_mask → export through the driver.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets.affinity import PathIndex, affinity_labels, edge_to_affinity, path_points, search_directions
from irn.misc.random_walk import (dense_affinity, dense_transition, random_walk, rw_to_scores,
                              sparse_transition)
from irn.misc.settings import config_path, load_settings

_VOC = load_settings(config_path("voc"))
RW = {"beta": _VOC.beta, "exp_times": _VOC.exp_times, "radius": _VOC.rw_radius}  # the walk's settings

REPO = Path(__file__).resolve().parents[2]
IRN = REPO / "first-stage" / "irn"

R5_DST = [(0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (1, -1), (1, 1), (3, 0), (0, 4), (4, 0), (1, -2), (1, 2),
          (2, -1), (2, 1), (2, -2), (2, 2), (1, -3), (1, 3), (2, -3), (2, 3), (3, -2), (3, -1), (3, 1), (3, 2),
          (1, -4), (1, 4), (3, -3), (3, 3), (4, -1), (4, 1), (2, -4), (2, 4), (4, -2), (4, 2)]


# ----------------------------------------------------------------------------- path index (oracles 1–4)


def test_r5_directions_groups_and_order():
    pi = PathIndex(5)
    assert pi.rf == 4 and pi.n_dirs == 34
    assert dict(zip(pi.group_lengths, (len(g) for g in pi.groups))) == {2: 2, 3: 2, 4: 4, 5: 2, 6: 4, 7: 2, 8: 8,
                                                                        10: 6, 11: 4}
    assert [tuple(int(v) for v in d) for d in pi.search_dst] == R5_DST


def test_path_point_sets():
    def pts(d):
        return {tuple(int(v) for v in p) for p in path_points(d)}
    assert pts((0, 1)) == {(0, 0), (0, 1)}
    assert pts((1, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert pts((1, -1)) == {(0, 0), (0, -1), (1, 0), (1, -1)}
    assert pts((2, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)}
    assert pts((3, -1)) == {(0, 0), (0, -1), (1, 0), (1, -1), (2, 0), (2, -1), (3, 0), (3, -1)}
    assert pts((0, 4)) == {(0, x) for x in range(5)}
    for r in (5, 10):
        for d in search_directions(r):
            p = path_points(d)
            assert tuple(p[0]) == d  # the first stored point is the destination
            assert {(0, 0), d} <= {tuple(q) for q in p}


def test_r10_sizes_and_direction_count_formula():
    pi = PathIndex(10)
    assert pi.rf == 9 and pi.n_dirs == 152 and len(pi.groups) == 20
    assert pi.group_lengths == tuple(n for n in range(2, 23) if n != 17)
    assert dict(zip(pi.group_lengths, (len(g) for g in pi.groups))) == {
        2: 2, 3: 2, 4: 4, 5: 2, 6: 6, 7: 4, 8: 10, 9: 2, 10: 12, 11: 4, 12: 12, 13: 2, 14: 8, 15: 8, 16: 22,
        18: 16, 19: 6, 20: 20, 21: 4, 22: 6}
    idx = pi.indices((128, 128))
    assert idx.window == (119, 110) and idx.n_src == 13_090 and tuple(idx.dst.shape) == (152, 13_090)
    for r in range(2, 13):
        inside = sum(1 for y in range(-r, r + 1) for x in range(-r, r + 1) if y * y + x * x < r * r)
        assert len(search_directions(r)) == (inside - 1) // 2


def test_flat_indices_for_map_sizes():
    pi = PathIndex(5)
    assert pi.indices((15, 20)).n_src == 11 * 12 == 132
    for h4, w4 in ((12, 16), (94, 125), (7, 3)):
        assert pi.indices((h4 + 5, w4 + 10)).n_src == (h4 + 1) * (w4 + 2)
    idx = pi.indices((15, 20))
    src = idx.src.numpy()
    assert src[0] == 4 and src[-1] == 10 * 20 + 15  # window rows 0..10, cols 4..15
    for k, (dy, dx) in enumerate(pi.search_dst):
        assert np.array_equal(idx.dst[k].numpy(), src + dy * 20 + dx)
    with pytest.raises(ValueError, match="too small"):
        PathIndex(10).indices((16, 16))


# ----------------------------------------------------------------------------- affinity (oracles 8, 9)


def _brute_affinity(edge: np.ndarray, pi: PathIndex) -> np.ndarray:
    hm, wm = edge.shape
    wh, ww = pi.window((hm, wm))
    out = np.zeros((pi.n_dirs, wh * ww), np.float32)
    for k, d in enumerate(pi.search_dst):
        pts = path_points((int(d[0]), int(d[1])))
        for s, (y, x) in enumerate((y, x) for y in range(wh) for x in range(pi.rf, pi.rf + ww)):
            out[k, s] = 1 - max(edge[y + py, x + px] for py, px in pts)
    return out


def test_edge_to_affinity_matches_definition():
    rng = np.random.default_rng(0)
    pi = PathIndex(5)
    edge = (rng.random((10, 13)) ** 3).astype(np.float32)
    idx = pi.indices(edge.shape)
    aff = edge_to_affinity(torch.from_numpy(edge)[None], idx)[0].numpy()
    np.testing.assert_array_equal(aff, _brute_affinity(edge, pi))
    assert np.all(edge_to_affinity(torch.zeros(2, 10 * 13), idx).numpy() == 1.0)
    # A boundary value b anywhere on a path (endpoints included) caps the affinity at 1 - b.
    for k, (dy, dx) in enumerate(pi.search_dst):
        for py, px in path_points((int(dy), int(dx))):
            e = torch.zeros(10, 13)
            e[2 + py, 6 + px] = 0.7
            s = 2 * (13 - 8) + (6 - 4)  # source (2, 6) in the 6x5 window, row-major
            assert edge_to_affinity(e[None], idx)[0, k, s] <= 1 - 0.7 + 1e-7


def test_affinity_labels_partition():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, (128, 128)).astype(np.uint8)
    label[rng.random((128, 128)) < 0.2] = 255
    idx = PathIndex(10).indices((128, 128))
    bg, fg, neg = affinity_labels(label, idx)
    for t in (bg, fg, neg):
        assert t.dtype == torch.float32 and tuple(t.shape) == (152, 13_090)
    assert float((bg * fg).sum() + (bg * neg).sum() + (fg * neg).sum()) == 0
    flat = torch.from_numpy(label.reshape(-1)).long()
    a, b = flat[idx.src][None], flat[idx.dst]
    valid = (a < 21) & (b < 21)
    assert torch.equal((bg + fg + neg).bool(), valid)
    assert torch.equal(bg.bool(), valid & (a == 0) & (b == 0))


def test_affinity_dataset_items(tmp_path):
    from datasets.views import AffinityView, open_source
    root = _tiny_voc(tmp_path)
    ids = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    ds = AffinityView(ids[:2], root / "SegmentationClass", 512, open_source("voc", root), PathIndex(10),
                      rescale=(0.5, 1.5), hor_flip=True, crop_method="random")
    item = ds[0]
    assert tuple(item["img"].shape) == (3, 512, 512) and item["label"].shape == (512, 512)
    bg, fg, neg = item["aff_bg_pos_label"], item["aff_fg_pos_label"], item["aff_neg_label"]
    assert tuple(bg.shape) == (152, 13_090) and bg.dtype == torch.float32
    assert float((bg * fg).sum() + (bg * neg).sum() + (fg * neg).sum()) == 0
    # The reduced label is the crop's pixels 4i+2 (PIL nearest at 1/4).
    ref = affinity_labels(np.ascontiguousarray(item["label"][2::4, 2::4]), ds.indices)
    for got, want in zip((bg, fg, neg), ref):
        assert torch.equal(got, want)
    assert float(bg.sum() + fg.sum()) > 0  # the image lies somewhere inside the padded crop


# ----------------------------------------------------------------------------- random walk (oracles 10–13)


def test_dense_affinity_and_transition_properties():
    rng = np.random.default_rng(2)
    h, w = 12, 15
    edge = torch.from_numpy(rng.random((h, w)).astype(np.float32) ** 2)
    a = dense_affinity(edge, 5)
    assert torch.equal(a, a.t()) and torch.all(a.diagonal() == 1)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    ys, xs = np.divmod(np.arange(h * w), w)
    far = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 >= 25
    assert torch.all(a[torch.from_numpy(far)] == 0)

    zero = dense_affinity(torch.zeros(h, w), 5)
    j = 6 * w + 7  # interior pixel: the whole radius-5 disc is inside the map
    assert int((zero[:, j] > 0).sum()) == 69
    t = dense_transition(torch.zeros(h, w), beta=10, exp_times=0, radius=5)
    nz = t[:, j][t[:, j] > 0]
    torch.testing.assert_close(nz, torch.full_like(nz, 1 / 69))
    for k in (0, 1, 4):
        tk = dense_transition(edge, beta=10, exp_times=k, radius=5)
        torch.testing.assert_close(tk.sum(0), torch.ones(h * w), atol=1e-5, rtol=0)
    # The sparse matrix holds the same transition probabilities (stored transposed).
    tt = sparse_transition(edge.double(), beta=10, radius=5).to_dense()
    torch.testing.assert_close(tt.t(), dense_transition(edge.double(), beta=10, exp_times=0, radius=5))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_constant_input_is_a_fixed_point(mode):
    cam = torch.full((2, 10, 13), 0.6)
    rw = random_walk(cam, torch.zeros(1, 10, 13), **RW, mode=mode)
    torch.testing.assert_close(rw, cam, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_boundary_column_splits_the_grid(mode):
    h, w, q = 9, 14, 6
    edge = torch.zeros(h, w)
    edge[:, q] = 1.0
    rw = random_walk(torch.ones(1, h, w), edge, **RW, mode=mode)[0]
    assert torch.all(rw[:, q] == 0)
    torch.testing.assert_close(rw[:, :q], torch.ones(h, q), atol=1e-5, rtol=0)
    torch.testing.assert_close(rw[:, q + 1:], torch.ones(h, w - q - 1), atol=1e-5, rtol=0)
    left = torch.zeros(1, h, w)
    left[:, :, :q] = 1.0
    crossed = random_walk(left, edge, **RW, mode=mode)[0]
    assert torch.all(crossed[:, q:] == 0)  # exactly nothing crosses


def _cam_like_maps(h: int, w: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cams, ridge = np.zeros((k, h, w)), np.zeros((h, w))
    for c in range(k):
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.15, 0.3) * min(h, w)
        d = np.hypot(yy - cy, xx - cx)
        cams[c] = np.exp(-(d / r) ** 2) + 0.05 * rng.random((h, w))
        ridge = np.maximum(ridge, np.exp(-((d - r) / 1.0) ** 2))
    cams /= cams.reshape(k, -1).max(1)[:, None, None] + 1e-5
    edge = np.clip(0.95 * ridge + 0.05 * rng.random((h, w)), 0, 1)
    return torch.from_numpy(cams).float(), torch.from_numpy(edge[None]).float()


@pytest.mark.parametrize("size", [(12, 16), (24, 32)])
def test_dense_and_sparse_walks_agree(size):
    h, w = size
    cam, edge = _cam_like_maps(h, w, 3, seed=h)
    keys = np.array([0, 3, 8, 15])
    dense = random_walk(cam, edge, **RW, mode="dense")
    sparse = random_walk(cam, edge, **RW, mode="sparse")
    s_d, p_d = rw_to_scores(dense, (4 * h - 2, 4 * w - 1), keys)
    s_s, p_s = rw_to_scores(sparse, (4 * h - 2, 4 * w - 1), keys)
    assert float((s_d - s_s).abs().max()) < 1e-4
    assert torch.equal(p_d, p_s)
    fp32 = random_walk(cam, edge, **RW, mode="sparse", sparse_dtype=torch.float32)
    assert float((rw_to_scores(fp32, (4 * h, 4 * w), keys)[0] - rw_to_scores(dense, (4 * h, 4 * w), keys)[0]
                  ).abs().max()) < 1e-4


def test_rw_scores_background_ties_and_zero_guard():
    rw = torch.zeros(2, 3, 4)
    score, pred = rw_to_scores(rw, (10, 13), np.array([0, 4, 9]))  # QUIRK-24 guard: no NaN
    assert not torch.isnan(score).any() and torch.all(pred == 0)
    assert tuple(score.shape) == (3, 10, 13) and torch.all(score[0] == 0.25)
    rw = torch.ones(1, 2, 2)
    rw[0, 0, 0] = 4.0  # after the global max: 1.0 there, 0.25 (= threshold, a tie) elsewhere
    score, pred = rw_to_scores(rw, (8, 8), np.array([0, 7]))
    assert float(score[1].max()) == 1.0 and int(pred[0, 0]) == 7 and int(pred[7, 7]) == 0


# ----------------------------------------------------------------------------- IRN network


def test_irn_shapes_loss_and_mean_shift(monkeypatch):
    from irn.net import resnet50_irn as irn
    from irn.net.backbone import resnet
    torch.manual_seed(0)
    model = irn.EdgeDisplacement(18).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        edge, disp = model(x)
    assert tuple(edge.shape) == (1, 13, 18) and tuple(disp.shape) == (2, 13, 18)
    assert float(edge.min()) >= 0 and float(edge.max()) <= 1
    model.mean_shift.running_mean.copy_(torch.tensor([0.5, -1.0]))
    with torch.no_grad():
        edge2, disp2 = model(x)
    assert torch.equal(edge2, edge)  # the mean shift touches only the displacement, in eval mode
    torch.testing.assert_close(disp2, disp - torch.tensor([0.5, -1.0])[:, None, None])

    pi = PathIndex(5)
    net = irn.AffinityDisplacementLoss(pi, backbone=resnet(18)).train()
    assert not net.backbone.training
    idx = pi.indices((16, 16))
    label = torch.randint(0, 3, (2, 16, 16))
    labels = [torch.stack(t) for t in zip(*(affinity_labels(label[i], idx) for i in range(2)))]
    losses = irn.combine_losses(net(torch.randn(2, 3, 64, 64), *labels))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    edge_p, disp_p = net.param_groups()
    assert all(p.grad is not None for p in edge_p + disp_p)
    assert all(p.grad is None for p in net.backbone.parameters())

    # A perfect instance displacement D(p) = c − p gives zero foreground displacement loss.
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    perfect = torch.stack([7.0 - yy, 9.0 - xx])[None]
    monkeypatch.setattr(irn.Net, "edge_and_displacement", lambda self, x: (torch.zeros(1, 1, 16, 16), perfect))
    ones = torch.ones(1, pi.n_dirs, idx.n_src)
    parts = net(torch.zeros(1, 3, 64, 64), ones * 0, ones, ones * 0)
    assert float(parts["disp_fg_sum"]) == 0 and float(parts["disp_fg_count"]) == pi.n_dirs * idx.n_src


def test_irn_train_backbone_option():
    """--irn_train_backbone: the backbone follows train mode, gets gradients and sits in the edge group;
    the default keeps the reference's frozen, eval-mode backbone."""
    from irn.net import resnet50_irn as irn
    from irn.net.backbone import resnet
    torch.manual_seed(2)
    pi = PathIndex(5)
    idx = pi.indices((12, 12))
    label = torch.randint(0, 3, (2, 12, 12))
    labels = [torch.stack(t) for t in zip(*(affinity_labels(label[i], idx) for i in range(2)))]
    net = irn.AffinityDisplacementLoss(pi, backbone=resnet(18), train_backbone=True).train()
    assert net.backbone.training
    irn.combine_losses(net(torch.randn(2, 3, 48, 48), *labels))["total"].backward()
    edge_p, disp_p = net.param_groups()
    backbone_ids = {id(p) for p in net.backbone.parameters()}
    assert backbone_ids <= {id(p) for p in edge_p} and not backbone_ids & {id(p) for p in disp_p}
    assert net.backbone.layer1[0].conv1.weight.grad is not None
    assert float(net.backbone.layer1[0].conv1.weight.grad.abs().sum()) > 0
    frozen = irn.AffinityDisplacementLoss(pi, backbone=resnet(18)).train()
    assert not frozen.backbone.training and not any(p.requires_grad for p in frozen.backbone.parameters())
    assert len(frozen.param_groups()[0]) == len(edge_p) - len(backbone_ids)


def test_irn_backbone_from_cam_weights(tmp_path):
    from irn.net import resnet50_irn as irn
    from irn.net.backbone import resnet
    from irn.net.resnet50_cam import Net as CamNet
    from models.checkpoint import CheckpointMismatchError
    from irn.step.train_irn import load_backbone_from_cam
    torch.manual_seed(1)
    cam = CamNet(backbone=resnet(18))
    torch.save(cam.state_dict(), tmp_path / "cam.pth")
    model = irn.AffinityDisplacementLoss(PathIndex(5), backbone=resnet(18))
    load_backbone_from_cam(model, tmp_path / "cam.pth")
    assert torch.equal(model.backbone.layer4[0].conv1.weight, cam.backbone.layer4[0].conv1.weight)
    with pytest.raises(CheckpointMismatchError, match=r"cam\.pth does not match ResNet .*missing keys 80: \[layer1\.2"):
        load_backbone_from_cam(irn.AffinityDisplacementLoss(PathIndex(5), backbone=resnet(34)), tmp_path / "cam.pth")


# ----------------------------------------------------------------------------- score files and gen_mask (16, 17)


def _worked_example() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    s = torch.zeros(3, 2, 3)
    s[0] = 0.25
    s[1] = torch.tensor([[0.9, 0.6, 0.1], [0.3, 0.2, 0.0]])
    s[2] = torch.tensor([[0.1, 0.5, 0.2], [0.3, 1.0, 0.05]])
    keys = np.array([0, 5, 12])
    return s, keys[s.argmax(0).numpy()], keys


def test_gen_mask_worked_example(tmp_path):
    from datasets.readers import read_mask
    from datasets.handoff import confidence_mask, margins, save_mask
    score, pred, _ = _worked_example()
    assert pred.tolist() == [[5, 5, 0], [5, 12, 0]]
    np.testing.assert_allclose(margins(score, "original").numpy(), [[0.65, 0.10, 0.05], [0.05, 0.75, 0.20]], atol=1e-6)
    assert float(margins(score, "zero")[1, 0]) == 0.0
    mask = confidence_mask(score, pred, 0.5, "original")
    assert mask.tolist() == [[1, 0, 0], [0, 0, 1]]
    path = save_mask(tmp_path / "m.png", mask)
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size == (3, 2)
        rgb = np.asarray(img)
        assert np.asarray(img.convert("1")).astype(int).tolist() == [[1, 0, 0], [0, 0, 1]]
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 2].tolist() == [255, 255, 255]
    assert set(np.unique(rgb)) == {0, 255} and (rgb == rgb[..., :1]).all()
    assert np.asarray(read_mask(path, "m")).tolist() == [[1, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize("tie_mode", ["original", "zero"])
@pytest.mark.parametrize("seed", range(4))
def test_gen_mask_counts_and_ranking(seed, tie_mode):
    from datasets.handoff import confidence_mask, margins
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 4))
    raw = rng.random((k, 17, 23)).astype(np.float32)
    if seed % 2:  # coarse values: many ties in scores and margins
        raw = np.round(raw * 4) / 4
    score = torch.cat([torch.full((1, 17, 23), 0.25), torch.from_numpy(raw)])
    keys = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 21), k, replace=False))])
    pred = keys[score.argmax(0).numpy()]
    mask = confidence_mask(score, pred, 0.5, tie_mode)
    m = margins(score, tie_mode).numpy()
    assert int(mask.sum()) == sum(int((pred == c).sum()) // 2 for c in np.unique(pred))
    for c in np.unique(pred):
        sel = pred == c
        kept, rest = m[sel & (mask == 1)], m[sel & (mask == 0)]
        if kept.size and rest.size:
            assert kept.min() >= rest.max()


def test_score_file_round_trip_and_reference_layout(tmp_path):
    from datasets.handoff import confidence_mask
    from irn.step.gen_mask import load_score
    from irn.step.make_sem_seg_labels import save_score
    score, pred, keys = _worked_example()
    path = save_score(tmp_path / "a.pt", torch.from_numpy(pred), score, torch.from_numpy(keys))
    raw = torch.load(path, weights_only=True)  # tensors only: loadable without unpickling objects
    assert set(raw) == {"pred", "score", "keys"} and raw["score"].dtype == torch.float32
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in raw.values())
    back = load_score(path)
    assert torch.equal(back["score"], score) and np.array_equal(back["pred"], pred)
    assert back["keys"].tolist() == keys.tolist()
    half = load_score(save_score(tmp_path / "h.pt", torch.from_numpy(pred), score, torch.from_numpy(keys), fp16=True))
    assert half["score"].dtype == torch.float16

    # The reference's layout: numpy pred/keys next to the score tensor, pickled by an old numpy
    # (module path numpy.core, legacy protocol-2 torch file).
    legacy = tmp_path / "ref.pt"
    torch.save({"pred": pred.astype(np.int64), "score": score, "keys": keys.astype(np.int64)}, legacy,
               _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ref = load_score(legacy, "ref")
    assert np.array_equal(ref["pred"], pred) and torch.equal(ref["score"], score)
    assert confidence_mask(ref["score"], ref["pred"], 0.5, "original").tolist() == [[1, 0, 0], [0, 0, 1]]
    from irn.step.gen_mask import ScoreFileError
    with pytest.raises(ScoreFileError, match="'missing'"):
        load_score(tmp_path / "missing.pt")


def test_gen_mask_driven_by_id_list(tmp_path):
    from irn.step.gen_mask import generate_masks, read_mask_png
    from irn.step.make_sem_seg_labels import save_score
    score, pred, keys = _worked_example()
    for name in ("a", "b", "stale"):
        save_score(tmp_path / "score" / f"{name}.pt", torch.from_numpy(pred), score, torch.from_numpy(keys))
    out = generate_masks(["a", "b"], tmp_path / "score", tmp_path / "mask", show_progress=False)
    assert sorted(p.name for p in (tmp_path / "mask").iterdir()) == ["a.png", "b.png"]
    assert out["kept_fraction"] == pytest.approx(2 / 6) and out["written"] == 2
    assert read_mask_png(tmp_path / "mask" / "a.png").tolist() == [[1, 0, 0], [0, 0, 1]]
    again = generate_masks(["a", "b"], tmp_path / "score", tmp_path / "mask", show_progress=False)
    assert again["written"] == 0 and again["kept_fraction"] == out["kept_fraction"]
    from irn.step.gen_mask import ScoreFileError
    with pytest.raises(ScoreFileError, match="'c'"):
        generate_masks(["a", "c"], tmp_path / "score", tmp_path / "mask", show_progress=False)


def test_fp_fn_rates():
    from irn.step.eval_sem_seg import fp_fn_rates
    conf = np.array([[1, 0], [1, 1]])  # rows gt, cols pred (oracle 20)
    fp, fn = fp_fn_rates(conf)
    np.testing.assert_allclose(fp, [1 - 1 / 2, 1 - 2 / 2])
    np.testing.assert_allclose(fn, [1 - 2 / 2, 1 - 1 / 2])


# ----------------------------------------------------------------------------- smoke run through the driver


def _tiny_voc(tmp_path: Path) -> Path:
    from datasets.synthetic.voc import make_synthetic_voc
    make_synthetic_voc(tmp_path / "data", train=8, val=2, test=0, size=(40, 56), classes=3, seed=0)
    return tmp_path / "data" / "VOC2012"


def _seed_outputs_from_gt(voc: Path, work: Path, ids: list[str]) -> None:
    """What PART A's steps would leave: ir_label seeds and CAM files, here made from the GT."""
    from irn.misc.cam_io import save_cam
    for name in ids:
        gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        Image.fromarray(gt.astype(np.uint8), mode="L").save(work / "result" / "ir_label" / f"{name}.png")
        classes = [int(c) for c in np.unique(gt) if 0 < c < 255]
        h, w = gt.shape
        h4, w4 = math.ceil(h / 4), math.ceil(w / 4)
        hi = np.stack([cv2.GaussianBlur((gt == c).astype(np.float32), (0, 0), 3.0) for c in classes])
        lo = np.stack([cv2.resize(m, (w4, h4), interpolation=cv2.INTER_AREA) for m in hi])
        hi /= hi.reshape(len(classes), -1).max(1)[:, None, None] + 1e-5
        lo /= lo.reshape(len(classes), -1).max(1)[:, None, None] + 1e-5
        save_cam(work / "result" / "cam" / f"{name}.npy", np.array(classes) - 1, lo, hi)


def test_smoke_irn_steps_through_driver(tmp_path):
    from irn import run_sample
    from datasets.readers import read_mask
    voc = _tiny_voc(tmp_path)
    work = tmp_path / "work"
    ids = (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    for d in ("ir_label", "cam"):
        (work / "result" / d).mkdir(parents=True)
    _seed_outputs_from_gt(voc, work, ids)
    argv = ["--voc12_root", str(voc), "--work_dir", str(work), "--device", "cpu", "--num_workers", "0",
            "--steps", "train_irn,make_sem_seg,eval_sem_seg,gen_mask,export", "--export_to", str(tmp_path / "out"),
            "--backbone_depth", "18", "--irn_crop_size", "64", "--irn_batch_size", "4", "--irn_num_epoches", "1",
            "--radius", "5", "--no_progress"]
    with pytest.warns(UserWarning, match="NO IMAGENET WEIGHTS"):
        res = run_sample.main(argv)
    assert res["train_irn"]["max_step"] == 2 and math.isfinite(res["train_irn"]["final_loss"])
    assert len(res["train_irn"]["mean_shift"]) == 2
    state = torch.load(work / "sess" / "res18_irn.pth", weights_only=True)
    assert torch.equal(state["mean_shift.running_mean"], torch.tensor(res["train_irn"]["mean_shift"]))
    assert res["make_sem_seg"]["written"] == len(ids)
    assert 0.0 <= res["eval_sem_seg"]["sem_seg_miou"] <= 1.0 and res["eval_sem_seg"]["images"] == 4
    assert 0.4 < res["gen_mask"]["kept_fraction"] <= 0.5 and res["gen_mask"]["kept_precision"] is not None

    for name in ids:
        gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        sem = np.asarray(Image.open(work / "result" / "sem_seg" / f"{name}.png"))
        assert sem.shape == gt.shape and set(np.unique(sem)) <= {0} | set(np.unique(gt)) - {255}
        sc = torch.load(work / "result" / "score" / f"{name}.pt", weights_only=True)
        assert tuple(sc["score"].shape[1:]) == gt.shape
        assert np.array_equal(sc["pred"].numpy(), sem)
        mask = np.asarray(read_mask(tmp_path / "out" / "irn_mask" / f"{name}.png", name))
        assert mask.shape == gt.shape
        assert int(mask.sum()) == sum(int((sem == c).sum()) // 2 for c in np.unique(sem))
        assert (tmp_path / "out" / "irn_pseudo_label" / f"{name}.png").is_file()
    summary = json.loads((work / "summary.json").read_text())
    assert {"train_irn", "make_sem_seg", "eval_sem_seg", "gen_mask"} <= set(summary["steps"])

    # Rerun-safe: nothing is redone without --overwrite.
    again = run_sample.main(argv)
    assert again["train_irn"].get("skipped") and again["make_sem_seg"]["written"] == 0
    assert again["gen_mask"]["written"] == 0

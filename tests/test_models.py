"""Network construction, shapes, initialisation and strict checkpoint loading
(spec/second-stage.md §3)."""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
from torch import Tensor, nn

from models import DeepLabV3Plus, ResNetV1d, build_model
from models.checkpoint import (
    CheckpointMismatchError,
    detect_and_map,
    load_backbone_weights,
    mmcls_to_ours,
    strip_module_prefix,
    torchvision_to_ours,
)
from models.resnetv1d import BasicBlock, Bottleneck, make_norm_layer

SMALL_DECODER = {"num_classes": 5, "aspp_channels": 16, "low_level_channels": 8}


def halve(n: int, times: int) -> int:
    """Size after `times` stride-2 stages; odd sizes round up (padded 3x3 convs)."""
    for _ in range(times):
        n = math.ceil(n / 2)
    return n


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------- shapes

@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (65, 47)])
def test_output_shapes(depth: int, output_stride: int, size) -> None:
    model = DeepLabV3Plus({"depth": depth, "output_stride": output_stride}, SMALL_DECODER).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    expansion = 1 if depth < 50 else 4
    deep = {8: 3, 16: 4}[output_stride]
    h4, w4 = halve(h, 2), halve(w, 2)
    assert out["logits"].shape == (2, 5, h, w)
    assert out["pre_logits"].shape == (2, 5, h4, w4)
    assert out["embeddings"].shape == (2, 16, h4, w4)
    assert out["layer1"].shape == (2, 64 * expansion, h4, w4)
    assert out["layer2"].shape == (2, 128 * expansion, halve(h, 3), halve(w, 3))
    assert out["layer4"].shape == (2, 512 * expansion, halve(h, deep), halve(w, deep))
    assert torch.isfinite(out["logits"]).all()


def test_odd_input_129x97_runs_at_both_output_strides() -> None:
    # The reference crashes here (floor-mode shortcut pool vs ceil-size conv).
    for output_stride in (8, 16):
        model = DeepLabV3Plus({"depth": 50, "output_stride": output_stride}, SMALL_DECODER).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 129, 97))
        assert out["logits"].shape == (1, 5, 129, 97)
        assert out["pre_logits"].shape == (1, 5, 33, 25)


def test_train_mode_forward_backward() -> None:
    model = DeepLabV3Plus({"depth": 18}, SMALL_DECODER).train()
    out = model(torch.randn(2, 3, 64, 64))
    out["logits"].mean().backward()
    assert model.backbone.stem_layer.conv1.weight.grad is not None
    assert model.aspp.convs[4].convs[1].weight.grad is not None


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_block_depths_construct_and_run(depth: int) -> None:
    backbone = ResNetV1d(depth=depth, output_stride=16).eval()
    blocks = [m for m in backbone.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == {18: 8, 34: 16}[depth]
    assert not any(isinstance(m, Bottleneck) for m in backbone.modules())
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert feats["layer1"].shape == (1, 64, 16, 16)
    assert feats["layer4"].shape == (1, 512, 4, 4)
    assert backbone.out_channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def test_decoder_channels_follow_backbone() -> None:
    model = DeepLabV3Plus({"depth": 18}, {"num_classes": 3})
    assert model.aspp.convs[0][0].in_channels == 512
    assert model.projector[0].in_channels == 64
    assert model.pre_classifier.convs[0].in_channels == 48 + 256
    assert model.classifier.out_channels == 3


# ------------------------------------------------------------- the R101 oracle

def test_r101_os16_parameter_count_and_names() -> None:
    model = DeepLabV3Plus({"depth": 101, "output_stride": 16}, {"num_classes": 21})
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 45_638_629
    assert len(sd) == 710
    for key in [
        "backbone.stem_layer.conv1.weight", "backbone.stem_layer.bn3.running_var",
        "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.downsample.1.weight",
        "backbone.layer2.0.downsample.1.weight", "backbone.layer2.0.downsample.2.bias",
        "backbone.layer4.0.downsample.1.weight", "backbone.layer3.22.conv3.weight",
        "aspp.convs.0.0.weight", "aspp.convs.0.1.weight",
        "aspp.convs.3.convs.0.weight", "aspp.convs.3.convs.1.weight",
        "aspp.convs.3.convs.3.weight", "aspp.convs.3.convs.4.weight",
        "aspp.convs.4.convs.1.weight", "aspp.convs.4.convs.2.weight",
        "aspp.projector.0.weight", "aspp.projector.1.weight",
        "projector.0.weight", "projector.1.weight",
        "pre_classifier.convs.0.weight", "pre_classifier.convs.4.weight",
        "classifier.weight", "classifier.bias",
    ]:
        assert key in sd, key
    assert sd["backbone.layer4.0.downsample.1.weight"].shape == (2048, 1024, 1, 1)
    assert sd["aspp.projector.0.weight"].shape == (256, 1280, 1, 1)
    assert sd["pre_classifier.convs.0.weight"].shape == (304, 1, 3, 3)
    assert sd["classifier.weight"].shape == (21, 256, 1, 1)


# ------------------------------------------------------- strides and dilations

def _dilations(layer: nn.Sequential):
    return [blk.conv2.dilation[0] for blk in layer]


def test_dilations_and_strides_os16() -> None:
    bb = ResNetV1d(depth=50, output_stride=16)
    assert _dilations(bb.layer4) == [2, 4, 8]
    assert [blk.conv2.padding[0] for blk in bb.layer4] == [2, 4, 8]
    assert _dilations(bb.layer3) == [1] * 6
    assert [bb.layer1[0].conv2.stride[0], bb.layer2[0].conv2.stride[0], bb.layer3[0].conv2.stride[0],
            bb.layer4[0].conv2.stride[0]] == [1, 2, 2, 1]


def test_dilations_and_strides_os8() -> None:
    bb = ResNetV1d(depth=50, output_stride=8)
    assert _dilations(bb.layer3) == [2] * 6
    assert _dilations(bb.layer4) == [4, 8, 16]
    assert [blk.conv2.padding[0] for blk in bb.layer4] == [4, 8, 16]
    assert bb.layer3[0].conv2.stride[0] == 1 and bb.layer4[0].conv2.stride[0] == 1


def test_contract_dilation_only_touches_stages_without_multi_grid() -> None:
    bb = ResNetV1d(depth=50, output_stride=8, contract_dilation=True)
    assert _dilations(bb.layer3) == [1] + [2] * 5
    assert _dilations(bb.layer4) == [4, 8, 16]
    bb = ResNetV1d(depth=50, output_stride=16, multi_grid=None, contract_dilation=True)
    assert _dilations(bb.layer4) == [1, 2, 2]
    bb = ResNetV1d(depth=50, output_stride=16, multi_grid=None)
    assert _dilations(bb.layer4) == [2, 2, 2]


def _dilations_basic(layer: nn.Sequential):
    return [blk.conv1.dilation[0] for blk in layer]


def test_basic_block_dilates_both_convs() -> None:
    bb = ResNetV1d(depth=18, output_stride=8)
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer4] == [(4, 4), (8, 8)]


def test_multi_grid_rates_per_layer4_block() -> None:
    # layer4 of R18 has 2 blocks: the leading rates are used, as in the reference
    assert _dilations_basic(ResNetV1d(depth=18, output_stride=16).layer4) == [2, 4]
    with pytest.raises(ValueError, match="multi_grid"):
        ResNetV1d(depth=50, multi_grid=[1, 2])


def test_shortcut_structure() -> None:
    bb = ResNetV1d(depth=50, output_stride=16)
    ds1 = bb.layer1[0].downsample
    assert len(ds1) == 2 and isinstance(ds1[0], nn.Conv2d) and isinstance(ds1[1], nn.BatchNorm2d)
    for layer in (bb.layer2, bb.layer3):
        pool, conv, norm = layer[0].downsample
        assert isinstance(pool, nn.AvgPool2d)
        assert pool.kernel_size == 2 and pool.stride == 2
        assert pool.ceil_mode and not pool.count_include_pad
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1)
        assert isinstance(norm, nn.BatchNorm2d)
    ident, conv, norm = bb.layer4[0].downsample
    assert isinstance(ident, nn.Identity) and conv.stride == (1, 1) and isinstance(norm, nn.BatchNorm2d)
    assert all(blk.downsample is None for layer in (bb.layer1, bb.layer2, bb.layer3, bb.layer4)
               for blk in list(layer)[1:])

    os8 = ResNetV1d(depth=50, output_stride=8)
    assert isinstance(os8.layer3[0].downsample[0], nn.Identity)
    assert isinstance(os8.layer4[0].downsample[0], nn.Identity)

    r18 = ResNetV1d(depth=18, output_stride=16)
    assert r18.layer1[0].downsample is None  # 64 -> 64, stride 1
    assert isinstance(r18.layer2[0].downsample[0], nn.AvgPool2d)
    assert isinstance(r18.layer4[0].downsample[0], nn.Identity)


def test_shortcut_pool_averages_only_real_pixels_on_odd_sizes() -> None:
    pool = ResNetV1d(depth=18).layer2[0].downsample[0]
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    y = pool(x)
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 1, 1].item() == 8.0  # lone corner pixel, not 8/4
    assert y[0, 0, 0, 1].item() == (2.0 + 5.0) / 2


# ------------------------------------------------------------- initialisation

def test_initialisation() -> None:
    bb = ResNetV1d(depth=50, output_stride=16)
    for m in bb.modules():
        if isinstance(m, Bottleneck):
            assert torch.all(m.bn3.weight == 0)
            assert torch.all(m.bn1.weight == 1) and torch.all(m.bn2.weight == 1)
            assert torch.all(m.bn3.bias == 0)
    assert torch.all(bb.stem_layer.bn3.weight == 1)
    assert torch.all(bb.layer2[0].downsample[2].weight == 1)
    w = bb.layer3[0].conv2.weight  # fan_in 256*3*3
    expected = math.sqrt(2.0 / (256 * 9))
    assert abs(w.std().item() / expected - 1) < 0.02
    assert abs(w.mean().item()) < 0.01 * expected  # ~8 sigma for 590k draws

    r18 = ResNetV1d(depth=18)
    assert all(torch.all(m.bn2.weight == 0) for m in r18.modules() if isinstance(m, BasicBlock))


def test_decoder_initialisation() -> None:
    model = DeepLabV3Plus({"depth": 18}, SMALL_DECODER)
    w = model.aspp.convs[0][0].weight  # fan_in 512
    assert abs(w.std().item() / math.sqrt(2.0 / 512) - 1) < 0.1
    assert torch.all(model.pre_classifier.convs[4].weight == 1)
    assert torch.all(model.aspp.projector[1].bias == 0)


def test_same_seed_same_weights_different_draws_differ() -> None:
    torch.manual_seed(1)
    a = DeepLabV3Plus({"depth": 18}, SMALL_DECODER)
    b = DeepLabV3Plus({"depth": 18}, SMALL_DECODER)
    torch.manual_seed(1)
    c = DeepLabV3Plus({"depth": 18}, SMALL_DECODER)
    assert torch.equal(a.classifier.weight, c.classifier.weight)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)


# ------------------------------------------------------------------ norm layers

def test_norm_layer_options() -> None:
    gn = ResNetV1d(depth=18, norm_layer={"type": "GN", "num_groups": 8}).eval()
    assert isinstance(gn.stem_layer.bn1, nn.GroupNorm) and gn.stem_layer.bn1.num_groups == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    with torch.no_grad():
        assert gn(torch.randn(1, 3, 64, 64))["layer4"].shape == (1, 512, 4, 4)

    sync = DeepLabV3Plus({"depth": 18, "norm_layer": "SyncBN"}, {**SMALL_DECODER, "norm_layer": "SyncBatchNorm"})
    assert isinstance(sync.backbone.layer1[0].bn1, nn.SyncBatchNorm)
    assert isinstance(sync.aspp.projector[1], nn.SyncBatchNorm)

    assert isinstance(make_norm_layer("BN")(4), nn.BatchNorm2d)
    assert isinstance(make_norm_layer({"type": "BN", "momentum": 0.01})(4), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="LayerNorm"):
        make_norm_layer("LayerNorm")
    with pytest.raises(ValueError, match="num_groups"):
        make_norm_layer({"type": "GN"})
    with pytest.raises(ValueError, match="groups"):
        make_norm_layer({"type": "GN", "num_groups": 8, "groups": 2})


# --------------------------------------------------------------------- config

def test_unknown_config_keys_raise() -> None:
    with pytest.raises(ValueError, match="depht"):
        DeepLabV3Plus({"depth": 18, "depht": 18}, SMALL_DECODER)
    with pytest.raises(ValueError, match="num_class"):
        DeepLabV3Plus({"depth": 18}, {"num_class": 3})
    with pytest.raises(ValueError, match="neck"):
        build_model({"backbone": {"depth": 18}, "decoder": SMALL_DECODER, "neck": {}})
    with pytest.raises(ValueError, match="depth"):
        ResNetV1d(depth=26)
    with pytest.raises(ValueError, match="output_stride"):
        ResNetV1d(depth=18, output_stride=32)


def test_build_model() -> None:
    model = build_model({"backbone": {"depth": 18, "output_stride": 8}, "decoder": SMALL_DECODER})
    assert isinstance(model, DeepLabV3Plus) and model.backbone.output_stride == 8


# ------------------------------------------------------------ checkpoint loading

def to_mmcls(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Our backbone naming -> an mmclassification ImageNet checkpoint's."""
    out: Dict[str, Tensor] = {}
    for key, value in ours.items():
        if key.startswith("stem_layer."):
            name, rest = key[len("stem_layer."):].split(".", 1)
            kind, index = name[:-1], int(name[-1]) - 1  # conv2 -> ("conv", 1)
            key = f"stem.{index}.{kind}.{rest}"
        out["backbone." + key] = value
    out["head.fc.weight"] = torch.randn(1000, 512)
    out["head.fc.bias"] = torch.randn(1000)
    return out


def randomised_backbone(depth: int = 18) -> ResNetV1d:
    """A backbone whose every tensor (BN statistics included) is distinctive."""
    bb = ResNetV1d(depth=depth)
    with torch.no_grad():
        for name, t in bb.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            else:
                t.normal_()
    return bb


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(sa[key], sb[key]), key


def test_mmcls_checkpoint_round_trip(tmp_path) -> None:
    source = randomised_backbone()
    mm = to_mmcls(source.state_dict())
    assert "backbone.stem.2.bn.num_batches_tracked" in mm and "backbone.stem.0.conv.weight" in mm
    path = tmp_path / "resnetv1d18_mmcls.pth"
    torch.save({"state_dict": mm, "meta": {}}, path)

    target = ResNetV1d(depth=18)
    loaded = load_backbone_weights(target, str(path))
    assert "stem_layer.conv1.weight" in loaded and not any("num_batches_tracked" in k for k in loaded)
    assert_same_tensors(source, target)


def test_pretrained_key_loads_in_model_constructor(tmp_path) -> None:
    source = randomised_backbone()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": to_mmcls(source.state_dict()), "meta": {}}, path)
    model = DeepLabV3Plus({"depth": 18, "pretrained": str(path)}, SMALL_DECODER)
    assert_same_tensors(source, model.backbone)


def test_plain_ours_torchvision_style_and_ddp_state_dicts_load() -> None:
    source = randomised_backbone()
    ours = dict(source.state_dict())
    with_fc = {**ours, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    ddp = {"module." + k: v for k, v in ours.items()}
    for obj in (ours, with_fc, ddp):
        target = ResNetV1d(depth=18)
        load_backbone_weights(target, obj)
        assert_same_tensors(source, target)


def test_mapping_functions_are_pure_and_exact() -> None:
    sd = {"backbone.stem.1.bn.weight": torch.ones(1), "backbone.stem.0.bn.num_batches_tracked": torch.tensor(3),
          "backbone.layer1.0.downsample.1.weight": torch.ones(1), "head.fc.bias": torch.ones(1)}
    mapped = mmcls_to_ours(sd)
    assert set(mapped) == {"stem_layer.bn2.weight", "layer1.0.downsample.1.weight"}
    assert len(sd) == 4  # input untouched
    assert set(torchvision_to_ours({"fc.weight": torch.ones(1), "layer1.0.conv1.weight": torch.ones(1)})) == {
        "layer1.0.conv1.weight"}
    assert set(strip_module_prefix({"module.a": torch.ones(1), "b": torch.ones(1)})) == {"a", "b"}
    assert set(detect_and_map({"state_dict": sd, "meta": {}})) == set(mapped)
    with pytest.raises(ValueError, match="not a recognised checkpoint"):
        detect_and_map({"epoch": 3})


def _checkpoint_file(tmp_path, sd: Dict[str, Tensor], name: str) -> str:
    path = tmp_path / name
    torch.save({"state_dict": sd, "meta": {}}, path)
    return str(path)


def test_extra_key_raises_naming_it(tmp_path) -> None:
    mm = to_mmcls(randomised_backbone().state_dict())
    mm["backbone.layer5.0.conv1.weight"] = torch.randn(3, 3)
    path = _checkpoint_file(tmp_path, mm, "extra.pth")
    target = ResNetV1d(depth=18)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_backbone_weights(target, path)
    message = str(info.value)
    assert "layer5.0.conv1.weight" in message and path in message and "unexpected keys 1" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    # nothing was loaded
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_key_raises_naming_it(tmp_path) -> None:
    mm = to_mmcls(randomised_backbone().state_dict())
    del mm["backbone.layer3.1.bn2.running_mean"]
    path = _checkpoint_file(tmp_path, mm, "missing.pth")
    with pytest.raises(KeyError, match=r"layer3\.1\.bn2\.running_mean") as info:
        load_backbone_weights(ResNetV1d(depth=18), path)
    assert "missing keys 1" in str(info.value)


def test_shape_mismatch_raises_naming_it(tmp_path) -> None:
    mm = to_mmcls(randomised_backbone().state_dict())
    mm["backbone.layer2.0.conv1.weight"] = torch.randn(128, 64, 1, 1)
    path = _checkpoint_file(tmp_path, mm, "shape.pth")
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight"):
        load_backbone_weights(ResNetV1d(depth=18), path)


def test_torchvision_single_stem_is_rejected_not_partially_loaded() -> None:
    ours = dict(randomised_backbone().state_dict())
    tv = {k: v for k, v in ours.items() if not k.startswith("stem_layer.")}
    tv.update({"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.randn(64)})
    with pytest.raises(KeyError) as info:
        load_backbone_weights(ResNetV1d(depth=18), tv)
    message = str(info.value)
    assert "conv1.weight" in message and "stem_layer.conv1.weight" in message

"""Segmenters: every registered one through the same checks (timm style), then each family's
own layout, initialisation and foreign-weight mapping (spec second-stage.md §3,
segmenters-and-coco.md §3-§5, §8), and the optimiser's parameter groups."""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict

import pytest
import torch
from torch import Tensor, nn

from models import MODELS, ResNet, build_model, build_optimizer, load_pretrained, make_norm_layer, param_groups
from models import deeplabv2, deeplabv3plus, segformer
from models.checkpoint import CheckpointMismatchError, strip_module_prefix, unwrap_state_dict
from models.mit import VARIETIES, DropPath, MixVisionTransformer, drop_path_rates
from models.resnet import BasicBlock, Bottleneck, FixedBatchNorm2d, irn_resnet, plain_stem_filter, plain_stem_key
from tests.conftest import CPU_CONFIGS, REPO
from engine.config import load_config

BECO = REPO / "configs/beco_voc.yaml"
CLASSES = 5


def halve(n: int, times: int) -> int:
    """Size after `times` stride-2 stages; odd sizes round up (padded convs)."""
    for _ in range(times):
        n = math.ceil(n / 2)
    return n


def model_cfg(config: str, *overrides: str):
    return load_config(REPO / "configs" / config, list(overrides)).model


def cpu_model(name: str, *overrides: str, num_classes: int = CLASSES) -> nn.Module:
    return build_model(model_cfg(CPU_CONFIGS[name][0], *overrides), num_classes)


def v3plus(*overrides: str) -> deeplabv3plus.DeepLabV3Plus:
    """DeepLabV3+ with a narrow decoder for speed, from the reference config plus overrides."""
    small = ["model.backbone.pretrained=null", "model.decoder.aspp_channels=16", "model.decoder.low_level_channels=8"]
    return build_model(model_cfg("beco_voc.yaml", *small, *overrides), CLASSES)


def v1d(**kw) -> ResNet:
    args = dict(depth=18, output_stride=16, stem="deep", avg_down=True, multi_grid=[1, 2, 4],
                contract_dilation=False, norm_layer="BN", dilate=True, conv_init="fan_in", zero_init_last=True)
    return ResNet(**{**args, **kw})


def resnet_b(**kw) -> ResNet:
    args = dict(depth=18, output_stride=8, stem="plain", avg_down=False, multi_grid=None,
                contract_dilation=False, norm_layer="BN", dilate=True, conv_init="fan_in", zero_init_last=True)
    return ResNet(**{**args, **kw})


def filter_fn(name: str) -> Callable:
    return inspect.getmodule(MODELS[name].build).checkpoint_filter_fn


def distinctive(module: nn.Module) -> nn.Module:
    """Every tensor (BN statistics included) set to something no init would give."""
    with torch.no_grad():
        for key, t in module.state_dict().items():
            if key.endswith("num_batches_tracked"):
                t.fill_(7)
            elif key.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_()
    return module


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# =============================================================== every registered segmenter

def test_every_segmenter_has_a_cpu_config_and_only_known_ones_do() -> None:
    assert set(CPU_CONFIGS) == set(MODELS)
    for name, (config, _) in CPU_CONFIGS.items():
        assert model_cfg(config).name == name


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("size", [(64, 64), (65, 47)])
def test_output_keys_shapes_and_finite(name: str, size) -> None:
    net = cpu_model(name).eval()
    h, w = size
    stride = CPU_CONFIGS[name][1]
    with torch.no_grad():
        out = net(torch.randn(2, 3, h, w))
    steps = int(math.log2(stride))
    assert out["logits"].shape == (2, CLASSES, h, w)
    assert out["pre_logits"].shape == (2, CLASSES, halve(h, steps), halve(w, steps))
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["pre_logits"]).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    net = cpu_model(name).train()
    with torch.no_grad():
        # Zero-initialised residual norms (Goyal et al.) make their branch's gradients exactly 0
        # at init by design; give them a scale so the test sees the wiring behind them.
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None and not m.weight.any():
                m.weight.fill_(1.0)
    out = net(torch.randn(4, 3, 64, 64))
    (out["logits"].square().mean() + out["pre_logits"].mean()).backward()
    for key, p in net.named_parameters():
        assert p.grad is not None, key
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_strict_load_of_its_own_state_dict(name: str) -> None:
    source, target = distinctive(cpu_model(name)), cpu_model(name)
    target.load_state_dict(source.state_dict(), strict=True)
    assert_same_tensors(source, target)
    # Its backbone's own names pass its foreign-weight filter unchanged.
    other = cpu_model(name)
    load_pretrained(other.backbone, source.backbone.state_dict(), filter_fn(name))
    assert_same_tensors(source.backbone, other.backbone)
    broken = dict(source.state_dict())
    broken.pop(next(iter(broken)))
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict(broken, strict=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_mode_randomness_follows_the_torch_seed(name: str) -> None:
    """Dropout and drop path draw from the torch RNG, so --determ runs repeat bit for bit; a net
    without them (DeepLabV2, spec §6) is deterministic in train mode."""
    net = cpu_model(name).train()
    random = any(isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p > 0 or isinstance(m, DropPath)
                 for m in net.modules())
    x = torch.randn(4, 3, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(net(x)["logits"].detach())
    torch.manual_seed(4)
    other = net(x)["logits"].detach()
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], other) != random


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_nets_of_a_pair_draw_different_heads(name: str) -> None:
    torch.manual_seed(1)
    a, b = cpu_model(name), cpu_model(name)
    torch.manual_seed(1)
    c = cpu_model(name)
    assert_same_tensors(a, c)
    assert not torch.equal(list(a.parameters())[-2], list(b.parameters())[-2])


# --------------------------------------------------------- foreign weights, written and read back

def to_mmcls_v1d(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Our ResNetV1d naming -> an mmclassification ImageNet checkpoint's (deep stem as stem.<i>)."""
    out: Dict[str, Tensor] = {}
    for key, value in ours.items():
        if key.startswith("stem_layer."):
            name, rest = key[len("stem_layer."):].split(".", 1)
            key = f"stem.{int(name[-1]) - 1}.{name[:-1]}.{rest}"  # conv2.weight -> stem.1.conv.weight
        out["backbone." + key] = value
    return {"state_dict": {**out, "head.fc.weight": torch.randn(1000, 512), "head.fc.bias": torch.randn(1000)},
            "meta": {"mmcls_version": "0.x"}}


def to_torchvision(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Our ResNet-B naming -> torchvision's flat resnet file (conv1/bn1 stem, fc classifier)."""
    out = {k.replace("stem_layer.", "", 1): v for k, v in ours.items()}
    return {**out, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}


def to_mmcls_resnet(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
    flat = {"backbone." + k: v for k, v in to_torchvision(ours).items() if not k.startswith("fc.")}
    return {"state_dict": {**flat, "head.fc.weight": torch.randn(1000, 512), "head.fc.bias": torch.randn(1000)}}


def to_nvlabs(ours: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {**ours, "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}


FOREIGN = {
    "deeplabv3plus": {"mmcls": to_mmcls_v1d, "ddp": lambda sd: {"module." + k: v for k, v in sd.items()}},
    "deeplabv2": {"torchvision": to_torchvision, "mmcls": to_mmcls_resnet,
                  "torchvision without counters": lambda sd: {k: v for k, v in to_torchvision(sd).items()
                                                             if "num_batches_tracked" not in k}},
    "segformer": {"nvlabs": to_nvlabs, "nvlabs without head": dict,
                  "wrapped": lambda sd: {"state_dict": to_nvlabs(sd)}},
}


def test_every_segmenter_has_foreign_layouts_to_test() -> None:
    assert set(FOREIGN) == set(MODELS)


@pytest.mark.parametrize("name,layout", [(n, lay) for n in sorted(FOREIGN) for lay in FOREIGN[n]])
def test_foreign_weights_round_trip_through_the_config_key(name: str, layout: str, tmp_path) -> None:
    source = distinctive(cpu_model(name).backbone)
    path = tmp_path / f"{name}_{layout.replace(' ', '_')}.pth"
    torch.save(FOREIGN[name][layout](dict(source.state_dict())), path)
    net = cpu_model(name, f"model.backbone.pretrained={path}")
    assert_same_tensors(source, net.backbone)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_missing_weights_file_names_the_config_key(name: str, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config key 'model\.backbone\.pretrained': no file .*nope\.pth"):
        cpu_model(name, f"model.backbone.pretrained={tmp_path / 'nope.pth'}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_foreign_file_with_an_extra_key_is_refused_naming_it_and_loads_nothing(name: str) -> None:
    target = cpu_model(name).backbone
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sd = dict(distinctive(cpu_model(name).backbone).state_dict())
    sd["layer5.extra.weight"] = torch.randn(3)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(target, sd, filter_fn(name))
    assert "layer5.extra.weight" in str(info.value) and "unexpected keys 1" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ----------------------------------------------------------------------- spec oracles (§8)

@pytest.mark.parametrize("config,classes,params,entries", [
    ("beco_voc.yaml", 21, 45_638_629, 710),
    ("beco_voc.yaml", 81, 45_654_049, 710),
    ("beco_voc_deeplabv2.yaml", 21, 44_048_532, 632),
    ("beco_voc_deeplabv2.yaml", 81, 48_472_452, 632),
    ("beco_voc_segformer_b2.yaml", 21, 25_778_133, 348),
    ("beco_voc_segformer_b2.yaml", 81, 25_793_553, 348),
])
def test_parameter_and_state_dict_entry_oracles(config: str, classes: int, params: int, entries: int) -> None:
    """Spec segmenters-and-coco.md §8.1-2 (one network, measured on the reference)."""
    with torch.device("meta"):
        net = build_model(model_cfg(config, "model.backbone.pretrained=null"), classes)
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == entries


def test_backbone_and_head_oracles() -> None:
    """§8.1: ResNet-101-B backbone 42,500,160; MiT-B2 encoder 24,196,288; SegFormer head 1,576,448."""
    with torch.device("meta"):
        v2 = build_model(model_cfg("beco_voc_deeplabv2.yaml", "model.backbone.pretrained=null"), 21)
        b2 = build_model(model_cfg("beco_voc_segformer_b2.yaml", "model.backbone.pretrained=null"), 21)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(v2.backbone) == 42_500_160
    assert count(b2.backbone) == 24_196_288
    assert count(b2.decoder) == 1_576_448
    assert sum(b.numel() for b in b2.buffers()) == 513  # the head's BN: 256 + 256 + 1


def test_deeplabv3plus_r101_keys_in_reference_order() -> None:
    with torch.device("meta"):
        sd = build_model(model_cfg("beco_voc.yaml", "model.backbone.pretrained=null"), 21).state_dict()
    for key in [
        "backbone.stem_layer.conv1.weight", "backbone.stem_layer.bn3.running_var",
        "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.downsample.1.weight",
        "backbone.layer2.0.downsample.1.weight", "backbone.layer2.0.downsample.2.bias",
        "backbone.layer4.0.downsample.1.weight", "backbone.layer3.22.conv3.weight",
        "aspp.convs.0.0.weight", "aspp.convs.3.convs.0.weight", "aspp.convs.3.convs.4.weight",
        "aspp.convs.4.convs.1.weight", "aspp.convs.4.convs.2.weight", "aspp.projector.0.weight",
        "projector.0.weight", "pre_classifier.convs.0.weight", "pre_classifier.convs.4.weight",
        "classifier.weight", "classifier.bias",
    ]:
        assert key in sd, key
    assert sd["backbone.layer4.0.downsample.1.weight"].shape == (2048, 1024, 1, 1)
    assert sd["aspp.projector.0.weight"].shape == (256, 1280, 1, 1)
    assert sd["pre_classifier.convs.0.weight"].shape == (304, 1, 3, 3)
    assert sd["classifier.weight"].shape == (21, 256, 1, 1)


def test_deeplabv2_r101_keys() -> None:
    """§4.4: torchvision's resnet101 names under backbone., the stem as stem_layer., aspp.c0..c3."""
    with torch.device("meta"):
        sd = build_model(model_cfg("beco_voc_deeplabv2.yaml", "model.backbone.pretrained=null"), 81).state_dict()
    assert sd["backbone.stem_layer.conv1.weight"].shape == (64, 3, 7, 7)
    assert "backbone.stem_layer.bn1.num_batches_tracked" in sd
    assert sd["backbone.layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert "backbone.layer4.0.downsample.1.running_mean" in sd and "backbone.layer3.22.bn3.weight" in sd
    assert [k for k in sd if k.startswith("aspp.")] == [f"aspp.c{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sd["aspp.c3.weight"].shape == (81, 2048, 3, 3)


def test_segformer_b2_keys_are_nvlabs_names_under_backbone() -> None:
    with torch.device("meta"):
        sd = build_model(model_cfg("beco_voc_segformer_b2.yaml", "model.backbone.pretrained=null"), 21).state_dict()
    assert sd["backbone.patch_embed1.proj.weight"].shape == (64, 3, 7, 7)
    assert sd["backbone.patch_embed4.proj.weight"].shape == (512, 320, 3, 3)
    assert "backbone.block3.5.attn.sr.weight" in sd and "backbone.block3.5.attn.norm.bias" in sd
    assert not any(k.startswith("backbone.block4.") and ".attn.sr." in k for k in sd)
    assert sd["backbone.block1.0.mlp.dwconv.dwconv.weight"].shape == (256, 1, 3, 3)
    assert sd["backbone.norm4.weight"].shape == (512,)
    assert sd["decoder.linear_c4.proj.weight"].shape == (768, 512)
    assert sd["decoder.linear_fuse.0.weight"].shape == (256, 3072, 1, 1)
    assert "decoder.linear_fuse.1.num_batches_tracked" in sd
    assert sd["classifier.weight"].shape == (21, 256, 1, 1)


# ==================================================================== the ResNet family

@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(64, 64), (65, 47)])
def test_deeplabv3plus_feature_shapes(depth: int, output_stride: int, size) -> None:
    model = v3plus(f"model.backbone.depth={depth}", f"model.backbone.output_stride={output_stride}").eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    expansion = 1 if depth < 50 else 4
    deep = {8: 3, 16: 4}[output_stride]
    h4, w4 = halve(h, 2), halve(w, 2)
    assert out["pre_logits"].shape == (2, CLASSES, h4, w4)
    assert out["embeddings"].shape == (2, 16, h4, w4)
    assert out["layer1"].shape == (2, 64 * expansion, h4, w4)
    assert out["layer2"].shape == (2, 128 * expansion, halve(h, 3), halve(w, 3))
    assert out["layer4"].shape == (2, 512 * expansion, halve(h, deep), halve(w, deep))


def test_odd_input_129x97_runs_at_both_output_strides() -> None:
    # The reference crashes here (floor-mode shortcut pool vs ceil-size conv).
    for output_stride in (8, 16):
        model = v3plus("model.backbone.depth=50", f"model.backbone.output_stride={output_stride}").eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 129, 97))
        assert out["logits"].shape == (1, CLASSES, 129, 97)
        assert out["pre_logits"].shape == (1, CLASSES, 33, 25)


@pytest.mark.parametrize("depth", [18, 34])
def test_basic_block_depths_construct_and_run(depth: int) -> None:
    backbone = v1d(depth=depth).eval()
    blocks = [m for m in backbone.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == {18: 8, 34: 16}[depth]
    assert not any(isinstance(m, Bottleneck) for m in backbone.modules())
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert feats["layer1"].shape == (1, 64, 16, 16)
    assert feats["layer4"].shape == (1, 512, 4, 4)
    assert backbone.out_channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def test_deeplabv3plus_decoder_channels_follow_backbone() -> None:
    model = build_model(model_cfg("demo.yaml"), 3)
    assert model.aspp.convs[0][0].in_channels == 512
    assert model.projector[0].in_channels == 64
    assert model.pre_classifier.convs[0].in_channels == 48 + 256
    assert model.classifier.out_channels == 3


def test_deeplabv3plus_is_the_reference_model_bit_for_bit() -> None:
    """Key order and shapes of the R101 model are those it had before the builder became open
    (digest recorded then); the seed-0 weights were checked equal then too."""
    import hashlib
    with torch.device("meta"):
        sd = build_model(model_cfg("beco_voc.yaml", "model.backbone.pretrained=null"), 21).state_dict()
    digest = hashlib.sha256("".join(f"{k}{tuple(v.shape)}{v.dtype}" for k, v in sd.items()).encode()).hexdigest()
    assert digest == "03e52f6415f93d908c4c173603baf82b1c86cc3509ab5d8ddc2d20e3d0177f9c"


def _dilations(layer: nn.Sequential):
    return [blk.conv2.dilation[0] for blk in layer]


def test_v1d_dilations_and_strides_os16() -> None:
    bb = v1d(depth=50, output_stride=16)
    assert _dilations(bb.layer4) == [2, 4, 8]
    assert [blk.conv2.padding[0] for blk in bb.layer4] == [2, 4, 8]
    assert _dilations(bb.layer3) == [1] * 6
    assert [bb.layer1[0].conv2.stride[0], bb.layer2[0].conv2.stride[0], bb.layer3[0].conv2.stride[0],
            bb.layer4[0].conv2.stride[0]] == [1, 2, 2, 1]


def test_v1d_dilations_and_strides_os8() -> None:
    bb = v1d(depth=50, output_stride=8)
    assert _dilations(bb.layer3) == [2] * 6
    assert _dilations(bb.layer4) == [4, 8, 16]
    assert [blk.conv2.padding[0] for blk in bb.layer4] == [4, 8, 16]
    assert bb.layer3[0].conv2.stride[0] == 1 and bb.layer4[0].conv2.stride[0] == 1


def test_contract_dilation_only_touches_stages_without_multi_grid() -> None:
    bb = v1d(depth=50, output_stride=8, contract_dilation=True)
    assert _dilations(bb.layer3) == [1] + [2] * 5
    assert _dilations(bb.layer4) == [4, 8, 16]
    bb = v1d(depth=50, output_stride=16, multi_grid=None, contract_dilation=True)
    assert _dilations(bb.layer4) == [1, 2, 2]
    bb = v1d(depth=50, output_stride=16, multi_grid=None)
    assert _dilations(bb.layer4) == [2, 2, 2]


def test_basic_block_dilates_both_convs() -> None:
    bb = v1d(depth=18, output_stride=8)
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer4] == [(4, 4), (8, 8)]


def test_multi_grid_rates_per_layer4_block() -> None:
    # layer4 of R18 has 2 blocks: the leading rates are used, as in the reference
    assert [blk.conv1.dilation[0] for blk in v1d(depth=18).layer4] == [2, 4]
    with pytest.raises(ValueError, match="multi_grid"):
        v1d(depth=50, multi_grid=[1, 2])


def test_v1d_shortcut_structure() -> None:
    bb = v1d(depth=50, output_stride=16)
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
    os8 = v1d(depth=50, output_stride=8)
    assert isinstance(os8.layer3[0].downsample[0], nn.Identity)
    assert isinstance(os8.layer4[0].downsample[0], nn.Identity)
    r18 = v1d(depth=18)
    assert r18.layer1[0].downsample is None  # 64 -> 64, stride 1
    assert isinstance(r18.layer2[0].downsample[0], nn.AvgPool2d)
    assert isinstance(r18.layer4[0].downsample[0], nn.Identity)


def test_shortcut_pool_averages_only_real_pixels_on_odd_sizes() -> None:
    pool = v1d(depth=18).layer2[0].downsample[0]
    y = pool(torch.arange(9.0).reshape(1, 1, 3, 3))
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 1, 1].item() == 8.0  # lone corner pixel, not 8/4
    assert y[0, 0, 0, 1].item() == (2.0 + 5.0) / 2


def test_resnet_initialisation() -> None:
    for bb in (v1d(depth=50), resnet_b(depth=50)):
        for m in bb.modules():
            if isinstance(m, Bottleneck):
                assert torch.all(m.bn3.weight == 0) and torch.all(m.bn3.bias == 0)
                assert torch.all(m.bn1.weight == 1) and torch.all(m.bn2.weight == 1)
        w = bb.layer3[1].conv2.weight  # fan_in 256*3*3
        expected = math.sqrt(2.0 / (256 * 9))
        assert abs(w.std().item() / expected - 1) < 0.02
        assert abs(w.mean().item()) < 0.01 * expected  # ~8 sigma for 590k draws
    assert torch.all(v1d(depth=50).stem_layer.bn3.weight == 1)
    assert all(torch.all(m.bn2.weight == 0) for m in v1d(depth=18).modules() if isinstance(m, BasicBlock))


def test_deeplabv3plus_decoder_initialisation() -> None:
    model = v3plus("model.backbone.depth=18")
    w = model.aspp.convs[0][0].weight  # fan_in 512
    assert abs(w.std().item() / math.sqrt(2.0 / 512) - 1) < 0.1
    assert torch.all(model.pre_classifier.convs[4].weight == 1)
    assert torch.all(model.aspp.projector[1].bias == 0)


def test_norm_layer_options() -> None:
    gn = v1d(norm_layer={"type": "GN", "num_groups": 8}).eval()
    assert isinstance(gn.stem_layer.bn1, nn.GroupNorm) and gn.stem_layer.bn1.num_groups == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    with torch.no_grad():
        assert gn(torch.randn(1, 3, 64, 64))["layer4"].shape == (1, 512, 4, 4)
    sync = v3plus("model.backbone.depth=18", "model.backbone.norm_layer=SyncBN", "model.decoder.norm_layer=SyncBN")
    assert isinstance(sync.backbone.layer1[0].bn1, nn.SyncBatchNorm)
    assert isinstance(sync.aspp.projector[1], nn.SyncBatchNorm)
    assert isinstance(make_norm_layer({"type": "BN", "momentum": 0.01})(4), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="LayerNorm"):
        make_norm_layer("LayerNorm")
    with pytest.raises(ValueError, match="num_groups"):
        make_norm_layer({"type": "GN"})


def test_resnet_refuses_unknown_settings() -> None:
    with pytest.raises(ValueError, match="depth"):
        v1d(depth=26)
    with pytest.raises(ValueError, match="output_stride"):
        v1d(output_stride=32)
    with pytest.raises(ValueError, match="stem"):
        v1d(stem="wide")
    with pytest.raises(ValueError, match="conv_init"):
        v1d(conv_init="xavier")


# ---------------------------------------------------- DeepLabV3+'s ImageNet file (mmcls V1d)

def test_mmcls_v1d_filter_is_pure_and_exact() -> None:
    sd = {"backbone.stem.1.bn.weight": torch.ones(1), "backbone.stem.0.bn.num_batches_tracked": torch.tensor(3),
          "backbone.layer1.0.downsample.1.weight": torch.ones(1), "head.fc.bias": torch.ones(1)}
    mapped = deeplabv3plus.checkpoint_filter_fn(sd)
    assert set(mapped) == {"stem_layer.bn2.weight", "stem_layer.bn1.num_batches_tracked",
                           "layer1.0.downsample.1.weight"}
    assert len(sd) == 4  # input untouched
    plain = {"fc.weight": torch.ones(1), "layer1.0.conv1.weight": torch.ones(1)}
    assert set(deeplabv3plus.checkpoint_filter_fn(plain)) == {"layer1.0.conv1.weight"}
    assert set(strip_module_prefix({"module.a": torch.ones(1), "b": torch.ones(1)})) == {"a", "b"}
    assert set(unwrap_state_dict({"state_dict": sd, "meta": {}})) == set(sd)
    with pytest.raises(ValueError, match="not a recognised checkpoint"):
        unwrap_state_dict({"epoch": 3})


def test_v1d_missing_key_and_shape_mismatch_are_named() -> None:
    mm = to_mmcls_v1d(dict(distinctive(v1d()).state_dict()))["state_dict"]
    missing = {k: v for k, v in mm.items() if k != "backbone.layer3.1.bn2.running_mean"}
    with pytest.raises(KeyError, match=r"layer3\.1\.bn2\.running_mean") as info:
        load_pretrained(v1d(), missing, deeplabv3plus.checkpoint_filter_fn)
    assert "missing keys 1" in str(info.value)
    wrong = {**mm, "backbone.layer2.0.conv1.weight": torch.randn(128, 64, 1, 1)}
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight"):
        load_pretrained(v1d(), wrong, deeplabv3plus.checkpoint_filter_fn)


def test_torchvision_single_stem_is_rejected_by_v1d_not_partially_loaded() -> None:
    ours = dict(distinctive(v1d()).state_dict())
    tv = {k: v for k, v in ours.items() if not k.startswith("stem_layer.")}
    tv.update({"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.randn(64)})
    with pytest.raises(KeyError) as info:
        load_pretrained(v1d(), tv, deeplabv3plus.checkpoint_filter_fn)
    assert "conv1.weight" in str(info.value) and "stem_layer.conv1.weight" in str(info.value)


# ================================================================== DeepLabV2 (spec §4)

def test_deeplabv2_backbone_layout() -> None:
    """§4.1: plain 7x7 stem, stride on the 3x3, every layer3 block dilation 2 and every layer4
    block dilation 4 (the first included), strided 1x1 shortcuts only in layer2.0."""
    bb = resnet_b(depth=50)
    stem = bb.stem_layer.conv1
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((7, 7), (2, 2), (3, 3), None)
    conv2 = lambda layer: [(b.conv2.stride[0], b.conv2.dilation[0], b.conv2.padding[0]) for b in layer]  # noqa: E731
    assert conv2(bb.layer2)[0] == (2, 1, 1)
    assert conv2(bb.layer3) == [(1, 2, 2)] * 6
    assert conv2(bb.layer4) == [(1, 4, 4)] * 3
    for i, stride in ((1, 1), (2, 2), (3, 1), (4, 1)):
        conv, norm = getattr(bb, f"layer{i}")[0].downsample
        assert conv.stride == (stride, stride) and conv.kernel_size == (1, 1) and isinstance(norm, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.AvgPool2d) for m in bb.modules())


def test_deeplabv2_odd_size_and_stride_8() -> None:
    """§8.3: 321 x 481 gives 41 x 61 pre_logits."""
    net = cpu_model("deeplabv2").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 321, 481))
    assert out["layer4"].shape[-2:] == (41, 61) and out["pre_logits"].shape == (1, CLASSES, 41, 61)
    assert out["logits"].shape == (1, CLASSES, 321, 481)


def test_deeplabv2_aspp_is_the_exact_sum_of_four_biased_convs() -> None:
    """§8.4: rates 6/12/18/24 with padding = rate; all weights 0 and biases b_k give sum(b_k)."""
    aspp = cpu_model("deeplabv2").aspp
    convs = list(aspp.children())
    assert [(c.dilation[0], c.padding[0], c.kernel_size) for c in convs] == [(r, r, (3, 3)) for r in (6, 12, 18, 24)]
    x = torch.randn(2, 512, 9, 11)
    with torch.no_grad():
        assert torch.allclose(aspp(x), sum(c(x) for c in convs), atol=1e-6)
        for k, c in enumerate(convs):
            c.weight.zero_()
            c.bias.copy_(torch.arange(CLASSES) * (k + 1.0))
        assert torch.equal(aspp(x), (torch.arange(CLASSES) * 10.0).view(1, -1, 1, 1).expand(2, -1, 9, 11))


def test_deeplabv2_head_init_and_depth_50() -> None:
    """§4.2: head weights normal(0, 0.01), biases exactly 0; the same code builds depth 50."""
    net = cpu_model("deeplabv2", "model.backbone.depth=50", num_classes=21)
    weights = torch.cat([c.weight.flatten() for c in net.aspp.children()])
    assert abs(weights.std().item() - 0.01) < 2e-4 and abs(weights.mean().item()) < 2e-4
    assert all(torch.all(c.bias == 0) for c in net.aspp.children())
    assert net.aspp.c0.in_channels == 2048


@pytest.mark.parametrize("arch,depth", [("resnet18", 18), ("resnet50", 50)])
def test_deeplabv2_loads_a_real_torchvision_resnet_strictly(arch: str, depth: int, tmp_path) -> None:
    """The names of torchvision's own resnet files (V1/V2 share them), fc and counters included."""
    import torchvision
    tv = distinctive(getattr(torchvision.models, arch)(weights=None))
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)
    net = cpu_model("deeplabv2", f"model.backbone.depth={depth}", f"model.backbone.pretrained={path}")
    ours = net.backbone.state_dict()
    for key, value in tv.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        mapped = f"stem_layer.{key}" if key.startswith(("conv1.", "bn1.")) else key
        assert torch.equal(ours[mapped], value), key


def test_deeplabv2_filter_renames_only_the_top_level_stem() -> None:
    sd = {"conv1.weight": torch.ones(1), "bn1.bias": torch.ones(1), "layer1.0.conv1.weight": torch.ones(1),
          "layer1.0.bn1.weight": torch.ones(1), "fc.weight": torch.ones(1), "backbone.layer2.0.bn1.bias": torch.ones(1)}
    assert set(deeplabv2.checkpoint_filter_fn(sd)) == {
        "stem_layer.conv1.weight", "stem_layer.bn1.bias", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
        "layer2.0.bn1.bias"}


# ================================================================ SegFormer (spec §5)

def test_mit_b2_stage_shapes_even_and_odd() -> None:
    """§8.3: stages 64/128/320/512 at strides 4-32; 321 x 481 -> 81x121, 41x61, 21x31, 11x16."""
    mit = MixVisionTransformer("b2", 0.1).eval()
    with torch.no_grad():
        even = mit(torch.randn(1, 3, 64, 64))
        odd = mit(torch.randn(1, 3, 321, 481))
    assert [tuple(f.shape[1:]) for f in even] == [(64, 16, 16), (128, 8, 8), (320, 4, 4), (512, 2, 2)]
    assert [tuple(f.shape[-2:]) for f in odd] == [(81, 121), (41, 61), (21, 31), (11, 16)]
    assert all(f.is_contiguous() for f in odd)


def test_segformer_embeddings_and_logits_at_an_odd_size() -> None:
    net = cpu_model("segformer").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 321, 481))
    assert out["embeddings"].shape == (1, 256, 81, 121)
    assert out["pre_logits"].shape == (1, CLASSES, 81, 121) and out["logits"].shape == (1, CLASSES, 321, 481)


def test_mit_b2_drop_path_rates_heads_scale_and_norms() -> None:
    """§8.5: drop path linspace(0, 0.1, 16) in stage order (block 0 has none); scale 0.125
    everywhere; block/stage norms eps 1e-6, patch-embed and reduction norms 1e-5; sr 8/4/2/1."""
    mit = MixVisionTransformer("b2", 0.1)
    blocks = [b for i in range(1, 5) for b in getattr(mit, f"block{i}")]
    assert len(blocks) == 16 and isinstance(blocks[0].drop_path, nn.Identity)
    rates = [0.0] + [b.drop_path.drop_prob for b in blocks[1:]]
    assert rates == pytest.approx([0.1 * k / 15 for k in range(16)], abs=1e-12)
    assert drop_path_rates([3, 4, 6, 3], 0.1)[1] == pytest.approx([0.02, 0.1 * 4 / 15, 0.1 * 5 / 15, 0.04])
    assert all(b.attn.scale == 0.125 for b in blocks)
    assert [b.attn.num_heads for b in blocks[::1]][:3] == [1, 1, 1] and blocks[-1].attn.num_heads == 8
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in blocks)
    assert all(getattr(mit, f"norm{i}").eps == 1e-6 and getattr(mit, f"patch_embed{i}").norm.eps == 1e-5
               for i in range(1, 5))
    srs = [getattr(mit, f"block{i}")[0].attn for i in range(1, 5)]
    assert [a.sr.kernel_size[0] for a in srs[:3]] == [8, 4, 2] and all(a.norm.eps == 1e-5 for a in srs[:3])
    assert not hasattr(srs[3], "sr")
    assert [(getattr(mit, f"patch_embed{i}").proj.kernel_size[0], getattr(mit, f"patch_embed{i}").proj.stride[0])
            for i in range(1, 5)] == [(7, 4), (3, 2), (3, 2), (3, 2)]


def test_every_mit_variety_builds() -> None:
    """QUIRK-S11: b0 builds as well as b1-b5."""
    for variety, (dims, depths) in VARIETIES.items():
        with torch.device("meta"):
            mit = MixVisionTransformer(variety, 0.1)
        assert mit.out_channels == list(dims)
        assert [len(getattr(mit, f"block{i}")) for i in range(1, 5)] == list(depths)
    with pytest.raises(ValueError, match="b6"):
        MixVisionTransformer("b6", 0.1)


def test_mit_init() -> None:
    mit = MixVisionTransformer("b0", 0.0)
    linear = mit.block3[0].mlp.fc1
    assert abs(linear.weight.std().item() - 0.02) < 1e-3 and torch.all(linear.bias == 0)
    conv = mit.patch_embed2.proj  # fan_out = 3 * 3 * 64
    assert abs(conv.weight.std().item() / math.sqrt(2 / (9 * 64)) - 1) < 0.05 and torch.all(conv.bias == 0)
    dw = mit.block1[0].mlp.dwconv.dwconv  # fan_out = 3 * 3 * 128 / 128
    assert abs(dw.weight.std().item() / math.sqrt(2 / 9) - 1) < 0.1


def test_drop_path_is_per_sample_scaled_and_follows_the_torch_rng() -> None:
    dp = DropPath(0.25)
    x = torch.ones(4000, 3, 2)
    dp.eval()
    assert dp(x) is x
    dp.train()
    torch.manual_seed(5)
    a = dp(x)
    torch.manual_seed(5)
    b = dp(x)
    assert torch.equal(a, b)
    per_sample = a.flatten(1)
    assert all(len(set(row.tolist())) == 1 for row in per_sample[:50])  # one decision per sample
    assert set(per_sample[:, 0].tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert abs(a.mean().item() - 1) < 0.05


def test_segformer_head_concatenates_deepest_first() -> None:
    """§5.2: the fuse conv reads [c4, c3, c2, c1]; only c4 feeds the first embed_dim inputs."""
    net = cpu_model("segformer").eval()
    head = net.decoder
    e = head.linear_c1.proj.out_features
    with torch.no_grad():
        for i in range(1, 5):
            lin = getattr(head, f"linear_c{i}").proj
            lin.weight.zero_()
            lin.bias.fill_(float(i))
        fuse_conv, bn = head.linear_fuse[0], head.linear_fuse[1]
        fuse_conv.weight.zero_()
        fuse_conv.weight[0, :e] = 1.0 / e
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        out = head(net.backbone(torch.randn(1, 3, 64, 64)))
    assert torch.allclose(out[0, 0], torch.full_like(out[0, 0], 4.0), atol=1e-5)
    assert torch.all(out[0, 1:] == 0)


def test_nvlabs_filter_drops_only_the_classifier() -> None:
    sd = {"patch_embed1.proj.weight": torch.ones(1), "head.weight": torch.ones(1), "head.bias": torch.ones(1),
          "block1.0.attn.q.weight": torch.ones(1)}
    assert set(segformer.checkpoint_filter_fn(sd)) == {"patch_embed1.proj.weight", "block1.0.attn.q.weight"}


# ====================================================== the first stage's ResNet (IRN's, spec §5)

def irn_reference_state(depth: int) -> Dict[str, Tensor]:
    """The initial backbone the first stage has always drawn, stated plainly: torchvision's
    layout (its convs in its module order, classifier left out), each conv drawn once by
    PyTorch's default init as it is constructed, then every conv Kaiming-normal (fan_out, ReLU)
    in module order; every norm the identity with fresh statistics. Call right after seeding."""
    import torchvision
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")()
    convs = [(n, m.weight.shape) for n, m in tv.named_modules() if isinstance(m, nn.Conv2d)]
    for _, shape in convs:
        nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
    drawn = {f"{n}.weight": nn.init.kaiming_normal_(torch.empty(shape), mode="fan_out", nonlinearity="relu")
             for n, shape in convs}
    fresh_norm = {"weight": torch.ones, "bias": torch.zeros, "running_mean": torch.zeros, "running_var": torch.ones}
    state = {}
    for key, meta in tv.state_dict().items():  # torchvision's order, which the saved files keep
        kind = key.rsplit(".", 1)[1]
        if key.startswith("fc."):
            continue
        state[key] = (drawn[key] if key in drawn else torch.tensor(0) if kind == "num_batches_tracked"
                      else fresh_norm[kind](meta.shape))
    return state


@pytest.mark.parametrize("depth,norm", [(18, "BN"), (34, "FixedBN"), (50, "FixedBN")])
def test_irn_resnet_draws_the_weights_the_first_stage_always_drew(depth: int, norm: str) -> None:
    """Bit for bit, from-scratch runs start where they always started (checked against the first
    stage's own ResNet before it was replaced by this one): the same tensors, in torchvision's
    order once the stem takes torchvision's names, and the RNG left where the heads built after
    the backbone expect it."""
    torch.manual_seed(5)
    state = irn_resnet(depth, norm).state_dict()
    after = torch.get_rng_state()
    torch.manual_seed(5)
    expected = irn_reference_state(depth)
    assert torch.equal(torch.get_rng_state(), after)
    assert [plain_stem_key(k) for k in expected] == list(state)
    for key, value in expected.items():
        ours = state[plain_stem_key(key)]
        assert ours.dtype == value.dtype and torch.equal(ours, value), key


def test_irn_resnet_layout() -> None:
    """Output stride 16 by a stride-1 layer4 that is not dilated; torchvision's stem and shortcuts."""
    bb = irn_resnet(50, "FixedBN").eval()
    assert all(m.dilation == (1, 1) for m in bb.modules() if isinstance(m, nn.Conv2d))
    assert [getattr(bb, f"layer{i}")[0].conv2.stride[0] for i in range(1, 5)] == [1, 2, 2, 1]
    assert [getattr(bb, f"layer{i}")[0].downsample[0].stride[0] for i in range(1, 5)] == [1, 2, 2, 1]
    assert all(isinstance(m, FixedBatchNorm2d) for m in bb.modules() if isinstance(m, nn.BatchNorm2d))
    assert bb.stem_layer.out_channels == 64
    assert bb.out_channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 65, 47))
    assert feats["layer4"].shape == (1, 2048, 5, 3) and feats["layer1"].shape == (1, 256, 17, 12)
    # The stride dropped to reach output stride 16 is simply lost, unlike the segmenters' dilation.
    assert _dilations(resnet_b(depth=50, output_stride=16, dilate=False).layer4) == [1, 1, 1]


def test_fixed_batchnorm_normalises_with_its_statistics_in_train_mode_and_keeps_them() -> None:
    bn = make_norm_layer("FixedBN")(3)
    assert type(bn) is FixedBatchNorm2d and type(make_norm_layer({"type": "FixedBatchNorm2d", "eps": 1e-3})(3)) \
        is FixedBatchNorm2d
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
        bn.weight.fill_(2.0)
    x = torch.randn(4, 3, 5, 5)
    y = bn.train()(x)
    assert torch.equal(y, bn.eval()(x))
    assert torch.allclose(y, 2 * (x - 1.0) / torch.sqrt(torch.tensor(4.0 + 1e-5)))
    assert torch.all(bn.running_mean == 1.0) and torch.all(bn.running_var == 4.0) and int(bn.num_batches_tracked) == 0
    y.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None  # the affine part still learns
    with pytest.raises(ValueError, match="momentum"):
        make_norm_layer({"type": "FixedBN", "momentum": 0.1})


def torchvision_resnet50_file(seed: int) -> Dict[str, Tensor]:
    """A state dict with the names and shapes of torchvision's resnet50-19c8e357.pth (the 2017
    file the first stage's README names: no BN step counters), distinctive values."""
    import torchvision
    with torch.device("meta"):
        names = {k: v.shape for k, v in torchvision.models.resnet50().state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=gen) + 0.5 for k, shape in names.items()}


def test_first_stage_torchvision_resnet50_file_loads_strictly(tmp_path) -> None:
    """The first stage's ImageNet file through its path: irn_resnet + plain_stem_filter +
    load_pretrained, every tensor to its torchvision name, fc dropped, counters kept at 0."""
    tv = torchvision_resnet50_file(0)
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(tv, path)
    net = irn_resnet(50, "FixedBN")
    loaded = load_pretrained(net, path, plain_stem_filter, "backbone_weights", counters_from_file=True)
    ours = net.state_dict()
    assert len(loaded) == len(tv) - 2
    for key, value in tv.items():
        if not key.startswith("fc."):
            assert torch.equal(ours[plain_stem_key(key)], value), key
    assert all(int(v) == 0 for k, v in ours.items() if k.endswith("num_batches_tracked"))
    # A newer torchvision file has counters; the first stage takes them, the segmenters keep their own.
    counted = {**tv, "layer1.0.bn1.num_batches_tracked": torch.tensor(9)}
    load_pretrained(net, counted, plain_stem_filter, counters_from_file=True)
    assert int(net.layer1[0].bn1.num_batches_tracked) == 9
    other = irn_resnet(50, "FixedBN")
    load_pretrained(other, counted, plain_stem_filter)
    assert int(other.layer1[0].bn1.num_batches_tracked) == 0
    broken = {k: v for k, v in tv.items() if not k.startswith("layer4.2.")}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys 15: \[layer4\.2\.bn1\.bias"):
        load_pretrained(irn_resnet(50, "FixedBN"), broken, plain_stem_filter)
    with pytest.raises(FileNotFoundError, match=r"config key 'backbone_weights': no file .*nope\.pth \(run this\)$"):
        load_pretrained(net, tmp_path / "nope.pth", plain_stem_filter, "backbone_weights", missing_hint="run this")


# ================================================================ optimiser and its groups

def _nets(n: int = 2) -> list[nn.Module]:
    return [cpu_model("segformer") for _ in range(n)]


def test_without_a_head_multiplier_one_group_per_net_as_the_reference() -> None:
    nets = _nets()
    cfg = load_config(BECO).optim
    opt = build_optimizer(nets, cfg)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 2
    for group, net in zip(opt.param_groups, nets):
        assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters()]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 1e-4)


def test_head_lr_mult_splits_backbone_and_head_and_the_poly_schedule_keeps_the_ratio() -> None:
    from utils.schedule import poly_factor
    nets = _nets()
    cfg = load_config(BECO, ["optim.name=adamw"]).optim
    opt = build_optimizer(nets, cfg)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([6e-5, 6e-4, 6e-5, 6e-4])
    for k, net in enumerate(nets):
        backbone = {id(p) for p in net.backbone.parameters()}
        group_b, group_h = opt.param_groups[2 * k], opt.param_groups[2 * k + 1]
        assert {id(p) for p in group_b["params"]} == backbone
        assert {id(p) for p in group_h["params"]} == {id(p) for p in net.parameters()} - backbone
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: poly_factor(it, 10, cfg.poly_power, 0.0))
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(10.0) and lrs[0] == pytest.approx(6e-5 * 0.7)


def test_param_groups_see_through_ddp_wrappers() -> None:
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module
    net = cpu_model("deeplabv2")
    groups = param_groups([Wrapper(net)], 0.01, 2.0)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.backbone.parameters()}
    assert groups[1]["lr"] == 0.02 and len(groups[1]["params"]) == 8  # aspp.c0..c3 weight + bias

"""Hugging Face's MiT files (`nvidia/mit-b*`) load into our MiT encoder and compute what
transformers' Segformer encoder computes (issue 25): random weights, saved the way
`save_pretrained` names them, loaded through `model.backbone.pretrained`, stage by stage."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from models import segformer
from models.checkpoint import CheckpointMismatchError, load_pretrained
from models.mit import MixVisionTransformer
from utils.errors import CheckpointError

# Nothing here may reach the network; transformers reads this when it is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

KEY = "model.backbone.pretrained"
# mit-b1's sizes (mit-b0's are SegformerConfig's defaults); every other hyper-parameter is shared.
B1 = {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2]}
OFF = {"drop_path_rate": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
       "classifier_dropout_prob": 0.0}


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn at random (norm scales around 1, biases non-zero), so a swapped or
    dropped tensor shows in the outputs; eval mode, so no dropout or drop path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.05 * noise)
    return model.eval()


def encoder_of(model: nn.Module) -> nn.Module:
    return getattr(model, "segformer", model)


def nvlabs_norm_eps(encoder: nn.Module) -> None:
    """transformers builds the blocks' and stages' LayerNorms with PyTorch's eps 1e-5; NVlabs
    (whose weights the Hub files are) and our encoder use 1e-6 there. Set theirs to ours, so the
    comparison checks the weights' mapping, not that constant (left as built, the stages differ by
    about 5e-6 relative); the patch embeds' and the spatial reduction's norms keep 1e-5 in both."""
    for name, m in encoder.named_modules():
        if isinstance(m, nn.LayerNorm) and "patch_embeddings" not in name and ".attention." not in name:
            m.eps = 1e-6


def stages_of_theirs(encoder: nn.Module, x: Tensor) -> List[Tensor]:
    with torch.no_grad():
        return list(encoder(pixel_values=x, output_hidden_states=True).hidden_states)


def saved_hf_file(model: nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    assert len(files) == 1, sorted(os.listdir(folder))
    return files[0]


def relative_errors(ours: List[Tensor], theirs: List[Tensor]) -> List[float]:
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    return [float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs)]


CASES = {  # name: (our variety, transformers class, config sizes)
    "b0 encoder alone": ("b0", "SegformerModel", {}),
    "b0 with ImageNet classifier": ("b0", "SegformerForImageClassification", {}),
    "b1 with segmentation head": ("b1", "SegformerForSemanticSegmentation", B1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_file_gives_transformers_stage_outputs(case: str, tmp_path: Path) -> None:
    variety, cls, sizes = CASES[case]
    theirs = randomised(getattr(transformers, cls)(transformers.SegformerConfig(**sizes, **OFF)), seed=1)
    path = saved_hf_file(theirs, tmp_path)
    ours = MixVisionTransformer(variety, 0.0)
    load_pretrained(ours, path, segformer.checkpoint_filter_fn, KEY)
    ours.eval()
    nvlabs_norm_eps(encoder_of(theirs))
    x = torch.randn(2, 3, 72, 100, generator=torch.Generator().manual_seed(2))  # odd stage sizes
    with torch.no_grad():
        errors = relative_errors(ours(x), stages_of_theirs(encoder_of(theirs), x))
    assert max(errors) <= 1e-5, errors


def hf_b0_model(seed: int = 3) -> nn.Module:
    """A b0 with its ImageNet classifier, as the Hub's mit-b0 file holds it."""
    return randomised(transformers.SegformerForImageClassification(transformers.SegformerConfig(**OFF)), seed)


def test_the_config_key_takes_the_hub_bin_file_and_a_renamed_safetensors(tmp_path: Path) -> None:
    source = hf_b0_model()
    hub = saved_hf_file(source, tmp_path / "hub")
    tensors = safetensors.torch.load_file(hub)
    torch.save(tensors, tmp_path / "pytorch_model.bin")  # the Hub's older file: torch.save of the dict
    (tmp_path / "mit_b0.pth").write_bytes(hub.read_bytes())  # told by content, not by name
    cfg = segformer.SegFormerCfg("segformer", False, segformer.BackboneCfg("b0", 0.0, None),
                                 segformer.DecoderCfg(embed_dim=32, channels=16, dropout=0.0, norm_layer="BN"))
    loaded = []
    for name in ("pytorch_model.bin", "mit_b0.pth"):
        cfg.backbone.pretrained = str(tmp_path / name)
        loaded.append(segformer.build(cfg, num_classes=3).backbone.state_dict())
    q = "segformer.encoder.block.2.1.attention.self.query.weight"
    kv = ("segformer.encoder.block.2.1.attention.self.key.weight",
          "segformer.encoder.block.2.1.attention.self.value.weight")
    for state in loaded:
        assert torch.equal(state["block3.1.attn.q.weight"], tensors[q])
        assert torch.equal(state["block3.1.attn.kv.weight"], torch.cat([tensors[kv[0]], tensors[kv[1]]]))
        assert torch.equal(state["norm4.bias"], tensors["segformer.encoder.layer_norm.3.bias"])


def test_layout_rule_is_an_encoder_prefix() -> None:
    one = torch.ones(1)
    assert segformer.is_hf_layout({"segformer.encoder.layer_norm.0.weight": one, "classifier.weight": one})
    assert segformer.is_hf_layout({"encoder.layer_norm.0.weight": one})
    assert not segformer.is_hf_layout({"block1.0.norm1.weight": one, "head.weight": one})
    assert not segformer.is_hf_layout({"segformer.decode_head.classifier.weight": one})


def test_hf_filter_maps_names_and_fuses_key_value() -> None:
    k, v, one = torch.full((4, 4), 1.0), torch.full((4, 4), 2.0), torch.ones(4)
    mapped = segformer.checkpoint_filter_fn({
        "encoder.block.1.0.attention.self.key.weight": k, "encoder.block.1.0.attention.self.value.weight": v,
        "encoder.block.1.0.layer_norm_2.bias": one, "encoder.patch_embeddings.3.layer_norm.weight": one,
        "encoder.block.0.1.attention.output.dense.weight": k, "encoder.block.3.0.mlp.dwconv.dwconv.bias": one,
        "decode_head.classifier.weight": one})
    assert set(mapped) == {"block2.0.attn.kv.weight", "block2.0.norm2.bias", "patch_embed4.norm.weight",
                           "block1.1.attn.proj.weight", "block4.0.mlp.dwconv.dwconv.bias"}
    assert torch.equal(mapped["block2.0.attn.kv.weight"], torch.cat([k, v]))


def test_mixed_layouts_are_refused_naming_the_file_and_the_keys(tmp_path: Path) -> None:
    state = dict(safetensors.torch.load_file(saved_hf_file(hf_b0_model(), tmp_path / "hub")))
    target = MixVisionTransformer("b0", 0.0)
    before = {k: t.clone() for k, t in target.state_dict().items()}
    mixed = {**state, "block1.0.norm1.weight": torch.ones(32)}
    path = tmp_path / "mixed.pth"
    torch.save(mixed, path)
    with pytest.raises(ValueError, match=rf"{path}.*not Hugging Face MiT encoder names: 1: \[block1\.0\.norm1"):
        load_pretrained(target, path, segformer.checkpoint_filter_fn, KEY)
    del state["segformer.encoder.block.0.1.attention.self.value.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"{path}.*these have one: 1: \[block1\.1\.attn\.kv\.bias \(key only\)\]"):
        load_pretrained(target, path, segformer.checkpoint_filter_fn, KEY)
    assert all(torch.equal(before[k], t) for k, t in target.state_dict().items())


def test_a_file_of_neither_layout_is_refused_naming_the_file_and_its_first_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7), "layer1.0.bn1.bias": torch.ones(64)}, path)
    with pytest.raises(CheckpointMismatchError, match=rf"{path}.*unexpected keys 2: \[conv1\.weight, layer1"):
        load_pretrained(MixVisionTransformer("b0", 0.0), path, segformer.checkpoint_filter_fn, KEY)


def test_a_cut_safetensors_file_is_refused_naming_it(tmp_path: Path) -> None:
    hub = saved_hf_file(hf_b0_model(), tmp_path / "hub")
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(hub.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"config key '{KEY}': cannot read {cut}"):
        load_pretrained(MixVisionTransformer("b0", 0.0), cut, segformer.checkpoint_filter_fn, KEY)

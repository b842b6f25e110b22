"""engine/trainer.py's pieces on their own, without a run: the optimiser step the loop and the
benchmarks share, and the resumable checkpoint's plain dict (users' resume and tools read it)."""
from __future__ import annotations

import copy
import io
from functools import partial

import torch
from torch import nn

from engine import checkpoint as ckpt_io
from engine.trainer import Run, accumulate_step, save_resumable, train_step
from tests.conftest import REPO
from engine.config import load_config
from utils.config import to_yaml
from utils.distributed import DistInfo
from utils.schedule import poly_factor


class TinySeg(nn.Module):
    """A segmenter without batch statistics, so micro-batches and one batch give one gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        logits = self.conv(x)
        return {"logits": logits, "pre_logits": logits}


def _run(tmp_path=None) -> Run:
    cfg = load_config(REPO / "configs/demo.yaml", ["method.mixing=false", "method.strong_aug.enabled=false",
                                                   "data.synthetic=null", "data.num_classes=4"])
    torch.manual_seed(0)
    nets = [TinySeg(), TinySeg()]
    optimizer = torch.optim.SGD([p for n in nets for p in n.parameters()], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(poly_factor, max_it=10, power=0.9))
    return Run(cfg, DistInfo(0, 1, 0, torch.device("cpu")), nets, optimizer,
               torch.amp.GradScaler("cpu", enabled=False), lambda: torch.autocast("cpu", enabled=False),
               scheduler, tmp_path, iters_per_epoch=5, best_miou=0.25, metrics_file=io.StringIO())


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(4, 3, 8, 8, generator=g), "label": torch.randint(0, 4, (4, 8, 8), generator=g),
            "mask": torch.randint(0, 2, (4, 8, 8), generator=g)}


def test_accumulated_micro_batches_give_one_big_batchs_gradients():
    """train.grad_accum: 4 images as two micro-batches of 2 give the gradients of one batch of
    4, for nets without batch statistics (BatchNorm's differ by construction) and a loss that
    is a mean over pixels of equal-size images; mixing and strong augmentation off, since
    they pair and draw within a batch."""
    run = _run()
    nets, batch = run.nets, _batch()

    def grads(batches):
        for n in nets:
            n.zero_grad(set_to_none=True)
        losses = accumulate_step(nets, batches, 1, run.cfg, run.autocast, torch.device("cpu"), run.scaler)
        return losses, [p.grad.clone() for n in nets for p in n.parameters()]

    big_losses, big = grads([batch])
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    acc_losses, acc = grads(halves)
    for a, b in zip(acc, big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for k in big_losses:
        torch.testing.assert_close(acc_losses[k], big_losses[k], rtol=1e-6, atol=1e-7)
    assert big[0].abs().sum() > 0  # the co-training and CE terms both reach the first net


def test_train_step_takes_one_optimiser_step_on_the_micro_batches_mean_gradient():
    """Two micro-batches of 2 move the weights as one batch of 4 does, and the loss terms are
    their mean."""
    whole, split = _run(), _run()
    split.nets = [copy.deepcopy(n) for n in whole.nets]
    split.optimizer = torch.optim.SGD([p for n in split.nets for p in n.parameters()], lr=0.1, momentum=0.9)
    batch = _batch()
    before = [p.detach().clone() for n in whole.nets for p in n.parameters()]
    big = train_step(whole, [batch], epoch=1)
    acc = train_step(split, [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)], epoch=1)
    after_whole = [p.detach() for n in whole.nets for p in n.parameters()]
    after_split = [p.detach() for n in split.nets for p in n.parameters()]
    for a, b, p0 in zip(after_split, after_whole, before):
        assert not torch.equal(b, p0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sorted(big) == sorted(acc) and "total" in big
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-6, atol=1e-7)
    # The schedule is the loop's to step: train_step leaves the learning rate as it was.
    assert whole.optimizer.param_groups[0]["lr"] == 0.1


def test_a_resumable_checkpoint_is_a_plain_dict_of_these_keys(tmp_path):
    run = _run(tmp_path)
    train_step(run, [_batch()], epoch=0)
    run.scheduler.step()
    path = save_resumable(run, epoch=0, it=3)
    assert path == tmp_path / ckpt_io.LATEST
    state = torch.load(path, weights_only=True)  # tensors and plain values only
    assert list(state) == ["net_state_dict", "optimizer", "scheduler", "scaler", "rng", "epoch", "iteration",
                           "iters_per_epoch", "best_miou", "method", "config"]
    assert list(state["net_state_dict"]) == ["network1", "network2"]
    assert (state["epoch"], state["iteration"], state["iters_per_epoch"], state["best_miou"]) == (0, 3, 5, 0.25)
    assert state["method"] == {"name": "beco", "epoch": 0} and state["config"] == to_yaml(run.cfg)
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["scheduler"]["last_epoch"] == 1
    for name, net in zip(ckpt_io.NET_NAMES, run.nets):
        for k, v in net.state_dict().items():
            assert torch.equal(state["net_state_dict"][name][k], v)

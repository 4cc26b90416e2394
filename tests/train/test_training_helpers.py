"""The trainer's small parts with hand-computed numbers: learning-rate warm-up, EMA decay warm-up and
update (fp32 and bf16 weights), micro-batch seeds, expert load statistics, the step metrics accumulator,
the preemption agreement, checkpoint cadence."""

import math
import os
import signal

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ditmoe.train.checkpointer import Checkpointer
from ditmoe.train.config import TrainConfig
from ditmoe.train.ema import EMA
from ditmoe.train.metrics import expert_load_stats
from ditmoe.train.preemption import PreemptionGuard
from ditmoe.train.step_metrics import StepMetrics
from ditmoe.train.trainer import lr_at, micro_batch_seed, set_lr


def test_lr_warms_up_linearly_then_stays():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    config = TrainConfig(lr=1e-3, lr_warmup_steps=4)
    lrs = []
    for step in range(6):
        set_lr(optimizer, config, step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)
    set_lr(optimizer, TrainConfig(lr=1e-3, lr_warmup_steps=0), 0)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_cosine_schedule_after_warm_up_ends_at_the_final_fraction():
    config = TrainConfig(lr=1e-3, lr_warmup_steps=2, steps=7, lr_schedule="cosine", lr_final_fraction=0.1)
    lrs = [lr_at(config, step) for step in range(7)]
    # warm-up, then 1e-4 + 9e-4 · (1 + cos(pi · k / 4)) / 2 for k = 0..4
    expected = [5e-4, 1e-3] + [1e-4 + 9e-4 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-4)


def test_ema_decay_warms_up():
    ema = EMA(nn.Linear(1, 1), decay=0.999)
    assert [ema.decay_at(n) for n in (0, 1, 8)] == pytest.approx([0.1, 2 / 11, 0.5])
    assert ema.decay_at(10_000) == 0.999  # (1 + n) / (10 + n) = 0.99910 > 0.999
    assert ema.decay_at(5_000) == pytest.approx(5001 / 5010)


def test_ema_update_numbers():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(0)  # decay 0.1: 0 + 0.9 · (1 - 0)
    assert ema.state_dict()["weight"].item() == pytest.approx(0.9)
    ema.update(1)  # decay 2/11: 0.9 + 9/11 · (1 - 0.9)
    assert ema.state_dict()["weight"].item() == pytest.approx(0.9 + 9 / 11 * 0.1)
    assert model.weight.item() == 1.0  # the model itself is not changed


def test_ema_of_bf16_weights_averages_in_fp32_without_changing_them():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in start.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update(3)  # decay 4/13: shadow + 9/13 · (w - shadow), w upcast exactly
    for name, p in model.named_parameters():
        expected = start[name] + 9 / 13 * (p.detach().float() - start[name])
        torch.testing.assert_close(ema.state_dict()[name], expected, rtol=1e-6, atol=1e-6)
        assert p.dtype == torch.bfloat16


def test_preemption_is_agreed_one_step_boundary_after_the_signal(one_rank_group):
    guard = PreemptionGuard()
    try:
        assert [guard.should_stop() for _ in range(3)] == [False] * 3
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.signalled == signal.SIGUSR1
        assert guard.should_stop() is False  # the all-reduce started here is read at the next boundary
        assert guard.should_stop() is True
    finally:
        guard.close()
        for sig in PreemptionGuard.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def test_micro_batch_seed():
    assert micro_batch_seed(7, 3, 5) == 28_693_098_381  # (7 · 1_000_003 + 3) · 4099 + 5
    seeds = {micro_batch_seed(seed, step, micro) for seed in range(3) for step in range(100) for micro in range(16)}
    assert len(seeds) == 3 * 100 * 16  # no two micro-batches share noise


def test_expert_load_stats():
    stats = expert_load_stats([[1, 1, 2, 0], [0, 0, 0, 0]], [0, 3])
    assert stats["moe/block0/load"] == [0.25, 0.25, 0.5, 0.0]
    assert stats["moe/block0/load_cv"] == pytest.approx(math.sqrt(0.03125) / 0.25)  # 0.7071
    assert stats["moe/block0/load_max_over_mean"] == 2.0
    assert stats["moe/block3/load"] == [0.0] * 4  # no tokens: all fractions 0, std = mean
    assert stats["moe/block3/load_cv"] == 1.0 and stats["moe/block3/load_max_over_mean"] == 0.0
    keys = ("load", "load_cv", "load_max_over_mean")
    assert sorted(stats) == sorted(f"moe/block{b}/{k}" for b in (0, 3) for k in keys)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_step_metrics_means_over_micro_batches(one_rank_group):
    metrics = StepMetrics(num_moe_layers=2, num_experts=3)
    for scale in (1.0, 3.0):
        metrics.add(loss=torch.tensor(scale), mse=torch.tensor(2 * scale), vb=torch.tensor(0.5 * scale),
                    balance_loss=torch.tensor(0.01 * scale),
                    expert_counts=[torch.tensor([1, 2, 3]) * int(scale), torch.tensor([0, 4, 0])])
    losses, loads = metrics.reduce()
    assert list(losses) == ["loss", "mse", "vb", "balance_loss"]
    assert losses == pytest.approx({"loss": 2.0, "mse": 4.0, "vb": 1.0, "balance_loss": 0.02})
    assert torch.equal(loads, torch.tensor([[4.0, 8.0, 12.0], [0.0, 8.0, 0.0]]))
    assert metrics.nonfinite_losses.item() == 0
    nan = torch.tensor(float("nan"))
    metrics.add(loss=nan, mse=nan, vb=torch.tensor(0.0), balance_loss=torch.tensor(0.0), expert_counts=[])
    assert metrics.nonfinite_losses.item() == 1


class Guard:
    def __init__(self, stop_at: int):
        self.stop_at, self.calls = stop_at, 0

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls >= self.stop_at


def test_checkpoint_cadence(tmp_path, capsys):
    config = TrainConfig(steps=7, ckpt_every=3)
    checkpointer = Checkpointer(config, tmp_path, rank=0, world_size=1, zero_stage=1)
    assert [s for s in range(1, 8) if checkpointer.is_due(s)] == [3, 6, 7]
    assert checkpointer.is_due(4, preempted=True)
    saved = []
    checkpointer.save = lambda step, *_: saved.append(step)
    assert [checkpointer.after_step(s, None, None, None) for s in range(1, 8)] == [False] * 7
    assert saved == [3, 6, 7]
    saved.clear()
    checkpointer.guard = Guard(stop_at=5)
    stopped = [s for s in range(1, 8) if checkpointer.after_step(s, None, None, None)]
    assert stopped[0] == 5 and saved[:2] == [3, 5]
    assert "preempted: saved checkpoint at step 5" in capsys.readouterr().out


def test_checkpoint_meta():
    config = TrainConfig(steps=7, ckpt_every=3)
    meta = Checkpointer(config, None, rank=0, world_size=4, zero_stage=3).meta(6, {"epoch": 1}, ema_shards=4)
    assert list(meta) == ["model_config", "train_config", "data", "rng", "world_size", "zero_stage", "step", "tag",
                          "ema_shards", "text_encoder", "vae"]
    assert meta["text_encoder"] is None  # class labels: no text encoder to record
    assert meta["vae"] is None  # none given (the trainer gives its data's)
    vae = {"name": "stabilityai/sd-vae-ft-ema", "scaling_factor": 0.18215}
    with_vae = Checkpointer(config, None, rank=0, world_size=1, zero_stage=0, vae=vae)
    assert with_vae.meta(1, {}, ema_shards=0)["vae"] == vae
    assert meta["tag"] == "step_00000006" and meta["data"] == {"epoch": 1} and meta["world_size"] == 4
    assert meta["model_config"] == config.model_config().to_dict() and meta["train_config"]["ckpt_every"] == 3
    assert torch.equal(torch.tensor(meta["rng"], dtype=torch.uint8), torch.get_rng_state())

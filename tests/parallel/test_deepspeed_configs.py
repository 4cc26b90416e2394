"""Every shipped DeepSpeed config is valid for DeepSpeed 0.19.8, has the thresholds docs/deepspeed_configs.md
explains, and trains with the trainer (batch sizes filled from the flags)."""

import json
from pathlib import Path

import pytest
import torch

from ditmoe.model import DiT, get_preset
from ditmoe.parallel.engine import deepspeed_config

from conftest import REPO, SMALL_DIGITS, free_port, metrics, run_cli

ALL_CONFIGS = sorted(p.name for p in (REPO / "deepspeed_configs").glob("*.json"))
CONFIGS = [name for name in ALL_CONFIGS if "_ep" not in name]
ZERO3 = [name for name in ALL_CONFIGS if name.startswith("zero3")]
BIG = ("DiT-MoE-B/2-8E2A", "DiT-MoE-XL/2-8E2A", "DiT-MoE-G/2-16E2A")


def zero_section(name: str) -> dict:
    return json.loads((REPO / "deepspeed_configs" / name).read_text())["zero_optimization"]


def meta_model(preset: str) -> DiT:
    with torch.device("meta"):
        return DiT(get_preset(preset))


def test_every_config_is_valid_for_deepspeed():
    """DeepSpeed's ZeRO config model forbids unknown keys: a misspelt key is an error, not a silent default."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert {"zero1.json", "zero2.json", "zero3.json", "zero3_ep.json", "zero3_offload.json"} <= set(ALL_CONFIGS)
    for name in ALL_CONFIGS:
        config = json.loads((REPO / "deepspeed_configs" / name).read_text())
        assert set(config) <= {"zero_optimization", "bf16", "gradient_clipping", "expert_parallel"}, name
        zero = DeepSpeedZeroConfig(**config["zero_optimization"])
        assert zero.stage == int(name[4]) and zero.overlap_comm and zero.contiguous_gradients, name
        assert zero.reduce_bucket_size == 5 * 10**7, name
        if zero.stage < 3:
            assert zero.reduce_scatter and zero.allgather_bucket_size == 5 * 10**7, name


@pytest.mark.parametrize("name", ZERO3)
def test_zero3_small_tensors_persist(name):
    """Biases, routers, the final linear and the timestep MLP's input layer of every preset are below the
    persistence threshold; from B width on, what persists is at most 1.2% of the parameters."""
    threshold = zero_section(name)["stage3_param_persistence_threshold"]
    assert threshold == 10**6
    for preset in ("DiT-MoE-S/2-8E2A", *BIG):
        model = meta_model(preset)
        small = [p for n, p in model.named_parameters()
                 if n.endswith("bias") or ".gate." in n or n.startswith(("final_layer.linear", "t_embedder.mlp.0"))]
        assert small and max(p.numel() for p in small) < threshold, preset
        if preset in BIG:
            total = sum(p.numel() for p in model.parameters())
            assert sum(p.numel() for p in model.parameters() if p.numel() < threshold) <= 0.012 * total, preset
    block = meta_model("DiT-MoE-XL/2-8E2A").blocks[0]
    assert block.adaLN_modulation[-1].weight.numel() > threshold  # adaLN weights are gathered, not kept whole


@pytest.mark.parametrize("name", ZERO3)
def test_zero3_prefetch_covers_one_block(name):
    zero = zero_section(name)
    block = sum(p.numel() for p in meta_model("DiT-MoE-XL/2-8E2A").blocks[0].parameters())
    assert 148 * 10**6 < block < zero["stage3_prefetch_bucket_size"] == 2 * 10**8
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10**9


def test_batch_sizes_are_filled_for_any_world_size():
    base = json.loads((REPO / "deepspeed_configs/zero3.json").read_text())
    cfg = deepspeed_config(base=base, global_batch_size=256, micro_batch_size=4, world_size=8, zero_stage=1,
                           precision="auto", grad_clip=1.0)
    batches = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert batches == (256, 4, 8)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"]
    fp32 = deepspeed_config(base=base, global_batch_size=8, micro_batch_size=4, world_size=2, zero_stage=1,
                            precision="fp32", grad_clip=1.0)
    assert not fp32["bf16"]["enabled"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.slow
def test_config_file_trains(tmp_path, name):
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2", "--deepspeed-config",
             f"deepspeed_configs/{name}", "--out", str(tmp_path)])
    records = metrics(tmp_path)
    assert len(records) == 2 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in records)
    assert Path(tmp_path / "checkpoints/latest").read_text().strip() == "step_00000002"


@pytest.mark.slow
def test_zero3_ep_config_on_two_ranks(tmp_path):
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "--master_addr", "127.0.0.1", "-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2",
             "--deepspeed-config", "deepspeed_configs/zero3_ep.json", "--ep-size", "2", "--out", str(tmp_path)],
            env={"OMP_NUM_THREADS": "1"})
    records = metrics(tmp_path)
    assert len(records) == 2 and records[-1]["balance_loss"] > 0


def test_zero3_ep_config_needs_ep_size(tmp_path):
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1", "--deepspeed-config",
                    "deepspeed_configs/zero3_ep.json", "--out", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "enables expert_parallel: pass --ep-size N > 1" in proc.stderr


def test_ep_size_not_dividing_experts_is_refused(tmp_path):
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1", "--ep-size", "3", "--out", str(tmp_path)],
                   check=False)
    assert proc.returncode != 0 and "ep_size=3 does not divide num_experts=4" in proc.stderr

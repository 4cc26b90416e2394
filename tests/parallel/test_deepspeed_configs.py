"""Every shipped DeepSpeed config trains with the trainer (batch sizes filled from the flags)."""

import json
from pathlib import Path

import pytest

from ditmoe.parallel.engine import deepspeed_config

from conftest import REPO, SMALL_DIGITS, free_port, metrics, run_cli

CONFIGS = sorted(p.name for p in (REPO / "deepspeed_configs").glob("*.json") if "_ep" not in p.name)


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
def test_config_file_trains(tmp_path, name):
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2", "--deepspeed-config",
             f"deepspeed_configs/{name}", "--out", str(tmp_path)])
    records = metrics(tmp_path)
    assert len(records) == 2 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in records)
    assert Path(tmp_path / "checkpoints/latest").read_text().strip() == "step_00000002"


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

"""The trainer on 2 real ranks (gloo, torchrun) with ZeRO-1/2/3 equals one process accumulating the
same micro-batches: per-step loss and balance loss within 1e-5, and the same weights afterwards."""

import pytest
import torch

from ditmoe.inference import load_model

from conftest import SMALL_DIGITS, STEPS, free_port, metrics, run_cli, torchrun

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, "--zero-stage", "0", "--micro-batch-size", "8",
             "--out", str(out)])
    return out


@pytest.mark.parametrize("stage,ep", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_two_ranks_equal_single_process(single, tmp_path, stage, ep):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    torchrun(tmp_path, "--zero-stage", str(stage), "--ep-size", str(ep))
    a, b = metrics(single), metrics(tmp_path)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "mse", "vb", "balance_loss"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5), key
    for key in ("moe/block0/load", "moe/block1/load"):
        assert [r[key] for r in b] == [r[key] for r in a]
    if ep == 1:  # DeepSpeed's zero_to_fp32 refuses AutoEP checkpoints; the EMA below covers them
        full = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"))
        single_weights = torch.load(single / "checkpoints/step_00000005/mp_rank_00_model_states.pt",
                                    weights_only=False)["module"]
        for name, value in full.items():
            torch.testing.assert_close(value, single_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    ema_single, _ = load_model(single, weights="ema")
    ema_ranks, _ = load_model(tmp_path, weights="ema")
    for (name, p), q in zip(ema_single.named_parameters(), ema_ranks.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_zero3_two_ranks_resume_is_bit_identical(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(full, "--zero-stage", "3")
    args = ["--zero-stage", "3", "--set", "ckpt_every=2"]
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "--master_addr", "127.0.0.1", "-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, *args,
             "--steps", "2", "--out", str(split)], env={"OMP_NUM_THREADS": "1"})
    proc = torchrun(split, *args, "--resume", "auto")
    assert "resumed from" in proc.stdout
    assert [r["loss"] for r in metrics(split)] == [r["loss"] for r in metrics(full)]
    assert [r["balance_loss"] for r in metrics(split)] == [r["balance_loss"] for r in metrics(full)]

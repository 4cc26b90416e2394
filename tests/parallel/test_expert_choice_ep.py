"""The trainer with EC-DiT's MoE layers (expert choice, GELU experts, no shared experts) and DiffMoE's capacity
predictor under expert parallelism (2 real ranks, gloo): ZeRO-3, EP 2 and activation checkpointing equal one
process on the same micro-batches (losses with the predictor's, expert loads, EMA); resume is bit-identical; the
universal checkpoint resumes it in one process without EP; the Hugging Face export of its weights reads them
through DeepSpeed's own files; the GPU contracts hold on every rank. (ZeRO-1/2, 4 ranks and SwiGLU experts:
tests/parallel/test_expert_parallel.py.)"""

import pytest
import torch

from ditmoe.inference import load_model

from conftest import SMALL_DIGITS, STEPS, free_port, metrics, run_cli, torchrun

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

EC = ["--set", "model.routing=expert_choice", "--set", "model.capacity_factor=1.5",
      "--set", "model.expert_activation=gelu", "--set", "model.num_shared_experts=0",
      "--set", "model.capacity_predictor=true"]
EP = [*EC, "--zero-stage", "3", "--ep-size", "2", "--activation-checkpointing", "1"]


def single_process(out, *args):
    return run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, *EC, "--micro-batch-size", "8", *args,
                    "--out", str(out)])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    single_process(out, "--zero-stage", "0")
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """2 ranks, ZeRO-3, EP 2, every block checkpointed; a checkpoint at step 3 and at the end. The GPU contracts
    are checked throughout (ditmoe.model.gpu_contracts: the all-to-alls and gathers of expert parallelism)."""
    out = tmp_path_factory.mktemp("ranks")
    torchrun(out, *EP, "--set", "ckpt_every=3", env={"DITMOE_CHECK_GPU_CONTRACTS": "1"})
    return out


def assert_same_ema(a, b):
    ema_a, _ = load_model(a, weights="ema")
    ema_b, _ = load_model(b, weights="ema")
    for (name, p), q in zip(ema_a.named_parameters(), ema_b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_equals_single_process(single, ranks):
    a, b = metrics(single), metrics(ranks)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "mse", "vb", "balance_loss"):  # balance_loss: the capacity predictors' loss
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5), key
    for key in ("moe/block0/load", "moe/block1/load"):  # exactly C per expert per sample: 6 of 16 tokens
        assert [r[key] for r in b] == [r[key] for r in a]
    assert all(r["balance_loss"] > 0 for r in b)
    assert_same_ema(single, ranks)


def test_resume_is_bit_identical(ranks, tmp_path):
    run_args = [*EP, "--set", "ckpt_every=3"]
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "--master_addr",
             "127.0.0.1", "-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, *run_args, "--steps", "3",
             "--out", str(tmp_path)], env={"OMP_NUM_THREADS": "1"})
    proc = torchrun(tmp_path, *run_args, "--resume", "auto")
    assert "resumed from" in proc.stdout
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(ranks)]
    for name, value in torch.load(ranks / "checkpoints/step_00000005/ema.pt").items():
        assert torch.equal(torch.load(tmp_path / "checkpoints/step_00000005/ema.pt")[name], value), name


def test_universal_resume_from_ep2_to_one_process(ranks, tmp_path):
    proc = single_process(tmp_path, "--zero-stage", "3", "--resume", str(ranks / "checkpoints/step_00000003"),
                          "--resume-universal")
    assert "resumed from" in proc.stdout
    ref, resumed = metrics(ranks)[3:], metrics(tmp_path)
    assert [r["step"] for r in resumed] == [4, 5]
    for key in ("loss", "mse", "vb", "balance_loss"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in ref], rel=1e-5), key
    assert_same_ema(ranks, tmp_path)


def test_exported_model_weights_match_the_single_process_run(single, ranks, tmp_path):
    """--weights model reads the ZeRO-3 partitions and AutoEP expert shards (GELU halves) of the expert-choice run,
    capacity predictors included."""
    run_cli(["tools/convert_ckpt_to_hf.py", "--ckpt", str(ranks), "--weights", "model", "--out", str(tmp_path / "m")])
    exported, _ = load_model(tmp_path / "m")
    saved = torch.load(single / "checkpoints/step_00000005/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {"blocks.1.mlp.experts.up_proj", "blocks.1.mlp.capacity_predictor.2.weight"} <= exported.state_dict().keys()
    for name, value in exported.state_dict().items():
        if name != "pos_embed":
            torch.testing.assert_close(value, saved[name].float(), rtol=1e-5, atol=1e-6, msg=name)

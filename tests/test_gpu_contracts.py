"""GPU contracts checked on the CPU (DITMOE_CHECK_GPU_CONTRACTS=1): each check refuses what CUDA would, and bf16
training steps of token choice, expert choice (also with Triton's experts) and a text model keep every contract."""

import pytest
import torch

from ditmoe.model import gpu_contracts
from ditmoe.model.gpu_contracts import GpuContractError

from conftest import SMALL_DIGITS, metrics, run_cli

CONTRACTS = {gpu_contracts.ENV: "1"}


def aligned(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def test_grouped_gemm_contracts():
    offsets = torch.tensor([3, 8], dtype=torch.int32)
    a, b = aligned(8, 16), aligned(2, 16, 24)
    gpu_contracts.check_grouped_gemm(a, b, offsets)
    gpu_contracts.check_grouped_gemm(aligned(24, 8).t(), a, offsets)  # the weight gradient's (N, A) × (A, K)
    with pytest.raises(GpuContractError, match="offsets must be 1-D int32, got torch.int64"):
        gpu_contracts.check_grouped_gemm(a, b, offsets.long())
    with pytest.raises(GpuContractError, match="2 offsets for 3 groups"):
        gpu_contracts.check_grouped_gemm(a, aligned(3, 16, 24), offsets)
    with pytest.raises(GpuContractError, match="operand a: data pointer .* is not 16-byte aligned"):
        gpu_contracts.check_grouped_gemm(aligned(8 * 16 + 1)[1:].view(8, 16), b, offsets)  # starts 4 bytes in
    with pytest.raises(GpuContractError, match=r"operand a: strides \(6, 1\) .* not multiples of 16 bytes"):
        gpu_contracts.check_grouped_gemm(aligned(8, 6), aligned(2, 6, 24), offsets)
    with pytest.raises(GpuContractError, match="operand b: neither row- nor column-major"):
        gpu_contracts.check_grouped_gemm(a, aligned(2, 16, 96)[:, :, ::4], offsets)  # 16-byte steps
    with pytest.raises(GpuContractError, match="two dtypes"):
        gpu_contracts.check_grouped_gemm(a, b.double(), offsets)
    with pytest.raises(GpuContractError, match="experts' weight of shape .* is not contiguous"):
        gpu_contracts.check_expert_weight(aligned(2, 24, 16).transpose(1, 2))


def test_attention_contracts():
    q = aligned(2, 4, 16, 8, dtype=torch.bfloat16)
    gpu_contracts.check_attention(q, q, q, None, torch.bfloat16)
    gpu_contracts.check_attention(q, q, q, torch.ones(2, 1, 1, 16, dtype=torch.bool), torch.bfloat16)
    with pytest.raises(GpuContractError, match="attention q is torch.float32, the attention's weights torch.bfloat16"):
        gpu_contracts.check_attention(q.float(), q, q, None, torch.bfloat16)
    with pytest.raises(GpuContractError, match="head dimension 12: flash needs a multiple of 8"):
        wide = aligned(2, 4, 16, 12, dtype=torch.bfloat16)
        gpu_contracts.check_attention(wide, wide, wide, None, torch.bfloat16)
    with pytest.raises(GpuContractError, match="attention k's head dimension is not contiguous"):
        gpu_contracts.check_attention(q, q.transpose(2, 3), q, None, torch.bfloat16)
    with pytest.raises(GpuContractError, match="attention mask is torch.float32, not boolean"):
        gpu_contracts.check_attention(q, q, q, torch.zeros(2, 1, 1, 16), torch.bfloat16)


def test_collective_contracts():
    gpu_contracts.check_collective("all_to_all", [torch.ones(4), torch.ones(4)], torch.device("cpu"))
    with pytest.raises(GpuContractError, match="all_gather: a tensor on meta, the process group needs cpu"):
        gpu_contracts.check_collective("all_gather", [torch.ones(4, device="meta")], torch.device("cpu"))
    with pytest.raises(GpuContractError, match="all_gather: a non-contiguous tensor"):
        gpu_contracts.check_collective("all_gather", [torch.ones(4, 4).t()], torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    ["--set", "model.routing=token_choice"],
    ["--set", "model.routing=expert_choice", "--set", "expert_gemm=triton"],
    ["--preset", "demo-t2i", "--data", "digits-t2i", "--set", "model.num_kv_heads=1"],
], ids=["token_choice", "expert_choice-triton", "text"])
def test_bf16_training_steps_keep_the_contracts(tmp_path, settings):
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2", "--global-batch-size", "8", "--precision", "bf16",
             *settings, "--out", str(tmp_path)], env=CONTRACTS)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_a_training_step_that_breaks_a_contract_stops(tmp_path):
    """Head dimension 12 (hidden 36, 3 heads): flash refuses it, so the checked run stops at the first step."""
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1", "--global-batch-size", "8", "--set",
                    "model.hidden_size=36", "--set", "model.num_heads=3", "--out", str(tmp_path)],
                   env=CONTRACTS, check=False)
    assert proc.returncode != 0 and "head dimension 12: flash needs a multiple of 8" in proc.stderr

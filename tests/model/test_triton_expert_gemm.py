"""``expert_gemm=triton``: DeepSpeed's Triton grouped GEMM behind ditmoe's expert ops, run on the CPU in Triton's
interpreter (fp32 and fp16; its bf16 ``tl.dot`` is wrong, so bf16 is checked on a GPU only), against the torch
path: the kernels with uneven and empty groups, the MoE layer of each routing and activation, compiled.
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton.)"""

import pytest
import torch

from ditmoe.model import get_preset
from ditmoe.model.grouped_gemm import expert_gemm, expert_gemm_waits, grouped_linear, set_expert_gemm, uses_triton
from ditmoe.model.moe import MoEFeedForward

from conftest import SMALL_DIGITS, metrics, run_cli


def grouped_linear_and_grads(x, weight, offsets, grad, mode):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with expert_gemm(mode):
        y = grouped_linear(x, weight, offsets)
        y.backward(grad)
    return y, x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts", [[5, 0, 17, 3], [0, 9, 0, 0, 40, 1], [0, 0, 0]])
def test_forward_input_and_weight_gradients_match_torch(dtype, counts):
    torch.manual_seed(0)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows, experts = sum(counts), len(counts)
    x = torch.randn(rows, 24, dtype=dtype)
    weight = torch.randn(experts, 40, 24, dtype=dtype) / 5  # (E, N, K): the experts' fused layout
    grad = torch.randn(rows, 40, dtype=dtype)
    got = grouped_linear_and_grads(x, weight, offsets, grad, "triton")
    # the reference in fp32 on the same rounded values (the CPU has no fp16 grouped GEMM worth trusting)
    want = grouped_linear_and_grads(x.float(), weight.float(), offsets, grad.float(), "torch")
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    for name, a, b in zip(("output", "input gradient", "weight gradient"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **tol, msg=name)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert got[2][empty].abs().sum() == 0  # experts without rows get no weight gradient


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_moe_layer_matches_torch(routing, activation):
    torch.manual_seed(1)
    config = get_preset("tiny").replace(routing=routing, expert_activation=activation, capacity_factor=1.5)
    layer = MoEFeedForward(config).train()
    x = torch.randn(2, 16, 32)
    results = {}
    for mode in ("torch", "triton"):
        layer.zero_grad()
        with expert_gemm(mode):
            y = layer(x)
            (y.square().mean() + layer.aux_loss).backward()
        results[mode] = [y.detach(), *(p.grad.clone() for p in layer.experts.parameters())]
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_layer_is_one_graph_and_matches_eager():
    torch.manual_seed(2)
    layer = MoEFeedForward(get_preset("tiny").replace(routing="expert_choice", expert_activation="gelu")).train()
    x = torch.randn(2, 16, 32, requires_grad=True)
    # a graph break would raise. aot_eager: the ops are the same graph nodes for either kernel, and inductor's
    # handling of them is what tests/train/test_host_sync_and_compile.py compiles (minutes from a cold cache)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    with expert_gemm("triton"):
        eager = layer(x)
        out = compiled(x)
        (grad_x,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, want, rtol=1e-5, atol=1e-6)


def test_auto_takes_triton_exactly_where_torch_would_wait():
    cpu = torch.device("cpu")
    with expert_gemm("auto"):  # the CPU: torch._grouped_mm reads no device memory back
        assert not uses_triton(torch.float32, cpu) and not expert_gemm_waits(torch.float32, cpu)
    with expert_gemm("triton"):
        assert uses_triton(torch.float32, cpu) and not expert_gemm_waits(torch.float32, cpu)


def test_triton_on_cpu_tensors_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="expert_gemm='triton' cannot run here: .*TRITON_INTERPRET=1"):
        set_expert_gemm("triton")
    with pytest.raises(ValueError, match="expert_gemm='fast' is not one of auto, torch, triton"):
        set_expert_gemm("fast")


@pytest.mark.slow
def test_training_with_triton_experts_has_the_losses_of_torch(tmp_path):
    """3 steps of the small digits run (fp32) through ``python -m ditmoe.train``, each kernel in turn."""
    losses = {}
    for mode in ("torch", "triton"):
        run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "3", "--global-batch-size", "8", "--set",
                 f"expert_gemm={mode}", "--out", str(tmp_path / mode)])
        losses[mode] = [r["loss"] for r in metrics(tmp_path / mode)]
    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)

"""Routing invariants, balance-loss values, and dispatch against a naive per-token reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from ditmoe.model import get_preset
from ditmoe.model.moe import MoEFeedForward
from ditmoe.model.routing import balance_loss, count_per_expert, expert_capacity, expert_choice, token_choice


def test_token_choice_picks_k_distinct_experts_with_softmax_weights():
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    r = token_choice(logits, top_k=2, normalize=False, alpha=0.005)
    experts = r.expert_index.view(50, 2)
    assert (experts[:, 0] != experts[:, 1]).all()
    assert torch.equal(r.token_index, torch.arange(50).repeat_interleave(2))
    probs = logits.softmax(-1)
    torch.testing.assert_close(r.weight.view(50, 2), probs.gather(1, experts))
    assert torch.equal(experts.sort(1).values, probs.topk(2).indices.sort(1).values)
    assert r.tokens_per_expert.sum() == 100


def test_token_choice_renormalised_weights_sum_to_one():
    r = token_choice(torch.randn(30, 6), top_k=3, normalize=True, alpha=0.0)
    torch.testing.assert_close(r.weight.view(30, 3).sum(1), torch.ones(30))
    assert r.aux_loss.item() == 0.0


def test_balance_loss_perfectly_balanced_gives_alpha():
    num_tokens, experts, k = 8, 4, 2
    probs = torch.full((num_tokens, experts), 1 / experts)
    chosen = torch.tensor([[0, 1], [2, 3]] * 4)  # each expert chosen 4 times
    assert balance_loss(probs, count_per_expert(chosen, experts), k, alpha=0.005).item() == pytest.approx(0.005)


def test_balance_loss_collapsed_router_gives_alpha_times_experts():
    num_tokens, experts, k = 10, 4, 1
    probs = F.one_hot(torch.zeros(num_tokens, dtype=torch.long), experts).float()
    chosen = torch.zeros(num_tokens, 1, dtype=torch.long)
    assert balance_loss(probs, count_per_expert(chosen, experts), k, alpha=0.01).item() == pytest.approx(0.01 * experts)


@pytest.mark.slow
def test_balance_loss_matches_megatron_switch_loss():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    torch.manual_seed(1)
    probs = torch.randn(64, 8).softmax(-1)
    chosen = probs.topk(2).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=8)
    reference = switch_load_balancing_loss_func(probs, counts, 64, 2, 8, 0.005)
    torch.testing.assert_close(balance_loss(probs, count_per_expert(chosen, 8), 2, alpha=0.005), reference)


def test_count_per_expert_equals_bincount_including_unused_experts():
    torch.manual_seed(2)
    chosen = torch.randint(0, 5, (40, 2))  # experts 5..7 never chosen
    counts = count_per_expert(chosen, 8)
    assert counts.dtype == torch.int64 and counts.shape == (8,)
    assert torch.equal(counts, torch.bincount(chosen.reshape(-1), minlength=8))
    assert counts[5:].sum() == 0 and counts.sum() == 80


def test_expert_choice_takes_exactly_capacity_tokens_per_expert_per_sample():
    n, t, e = 3, 16, 4
    cap = expert_capacity(2.0, t, e)
    assert cap == 8
    r = expert_choice(torch.randn(n, t, e), cap)
    assert r.aux_loss.item() == 0.0
    for sample in range(n):
        for expert in range(e):
            tokens = r.token_index[(r.expert_index == expert) & (r.token_index // t == sample)]
            assert len(tokens) == cap and len(tokens.unique()) == cap
    assert torch.equal(r.tokens_per_expert, torch.full((e,), n * cap))


def test_expert_capacity_bounds():
    assert expert_capacity(1.0, 16, 4) == 4
    assert expert_capacity(100.0, 16, 4) == 16
    assert expert_capacity(0.01, 16, 4) == 1
    assert expert_capacity(1.25, 10, 4) == math.ceil(1.25 * 10 / 4)


def naive_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over its assignments: the definition, not the fast path."""
    n, t, d = x.shape
    flat = x.reshape(-1, d)
    r = layer.route(x)
    out = torch.zeros_like(flat)
    for tok, exp, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()):
        gate, up = (layer.experts.gate_up_proj[exp] @ flat[tok]).chunk(2)
        out[tok] += w * (layer.experts.down_proj[exp] @ (F.silu(gate) * up))
    return (out + layer.shared_experts(flat)).reshape(n, t, d)


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_dispatch_equals_naive_reference(routing):
    torch.manual_seed(2)
    layer = MoEFeedForward(get_preset("tiny").replace(routing=routing))
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_expert_choice_dispatch_with_unserved_tokens():
    """Capacity 1: most tokens get no routed expert, only the shared one."""
    torch.manual_seed(3)
    layer = MoEFeedForward(get_preset("tiny").replace(routing="expert_choice", capacity_factor=0.25))
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_sorted_dispatch_order_matches_megatron_permute():
    from megatron.core.transformer.moe.moe_utils import permute

    torch.manual_seed(4)
    tokens = torch.randn(20, 8)
    r = token_choice(torch.randn(20, 4), top_k=2, normalize=False, alpha=0.0)
    routing_map = torch.zeros(20, 4, dtype=torch.bool)
    routing_map[r.token_index, r.expert_index] = True
    expected, _, _ = permute(tokens, routing_map)
    order = torch.argsort(r.expert_index, stable=True)
    torch.testing.assert_close(tokens[r.token_index[order]], expected)


def test_shared_experts_see_every_token():
    layer = MoEFeedForward(get_preset("tiny"))
    seen = []
    layer.shared_experts.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    layer(torch.randn(3, 16, 32))
    assert seen == [torch.Size([48, 32])]


def test_gradients_reach_router_and_experts_and_balance_loss_trains_router():
    layer = MoEFeedForward(get_preset("tiny"))
    layer.train()
    y = layer(torch.randn(2, 16, 32))
    (y.square().mean() + layer.aux_loss).backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
    assert layer.experts.down_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_per_expert_swiglus(dtype):
    """Outputs and gradients of the grouped GEMMs (hand-written backward) against autograd
    through plain per-expert SwiGLUs in fp32 on the same (rounded) values."""
    torch.manual_seed(5)
    layer = MoEFeedForward(get_preset("tiny")).to(dtype)
    counts = torch.tensor([3, 0, 5, 2])  # an expert without tokens too
    x = torch.randn(10, 32, dtype=dtype, requires_grad=True)
    y = layer.experts(x, counts)
    grad = torch.randn_like(y)
    y.backward(grad)
    w1 = layer.experts.gate_up_proj.detach().float().requires_grad_(True)
    w2 = layer.experts.down_proj.detach().float().requires_grad_(True)
    x2 = x.detach().float().requires_grad_(True)
    outs = []
    for e, chunk in enumerate(x2.split(counts.tolist())):
        gate, up = (chunk @ w1[e].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ w2[e].t())
    ref = torch.cat(outs)
    ref.backward(grad.float())
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), x2.grad, **tol)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad.float(), w1.grad, **tol)
    torch.testing.assert_close(layer.experts.down_proj.grad.float(), w2.grad, **tol)
    assert layer.experts.gate_up_proj.grad[1].abs().sum() == 0

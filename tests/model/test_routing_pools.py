"""Expert-choice routing pools (sample, group, batch), DiffMoE's capacity predictor and the measured activated
compute of its sampling-time threshold."""

import math

import pytest
import torch
from random_weights import randomized
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditmoe.model import DiT, get_preset
from ditmoe.model.card import activated_compute, attention_macs, count_parameters, linear_macs
from ditmoe.model.config import DiTConfig
from ditmoe.model.moe import MoEFeedForward, set_capacity_threshold
from ditmoe.model.routing import (
    expert_capacity,
    expert_choice,
    pool_assignments,
    pool_expert_choice,
    pool_sizes,
    threshold_choice,
)

EC = get_preset("tiny-ec")  # 16 image tokens, 4 experts, capacity factor 2, SwiGLU experts, shared experts
T = EC.num_tokens
NEW_KEYS = ("routing_pool", "routing_group_size", "capacity_predictor", "capacity_threshold",
            "capacity_predictor_weight")


def make_model(config: DiTConfig, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return randomized(DiT(config), seed).eval()


def inputs(config: DiTConfig = EC, n: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, config.num_classes, (n,), generator=gen)
    return x, t, y


def pools_of(config: DiTConfig, n: int) -> list[tuple[int, int]]:
    """(first row, tokens) of each routing pool of n samples."""
    bounds, start = [], 0
    for size in pool_sizes(config.routing_pool, config.routing_group_size, n, config.num_tokens):
        bounds.append((start, size))
        start += size
    return bounds


def test_pool_sizes():
    assert pool_sizes("sample", 0, 3, 16) == [16, 16, 16]
    assert pool_sizes("batch", 0, 3, 16) == [48]
    assert pool_sizes("group", 32, 4, 16) == [32, 32]
    assert pool_sizes("group", 32, 5, 16) == [32, 32, 16]  # the remaining sample: a smaller last pool
    assert pool_sizes("group", 64, 2, 16) == [32]
    assert pool_assignments(2.0, [32, 32, 16], 4) == 4 * (16 + 16 + 8)


@pytest.mark.parametrize("pool,group,n", [("sample", 0, 5), ("group", 2 * T, 6), ("group", 2 * T, 5),
                                          ("group", 3 * T, 5), ("batch", 0, 5)])
@pytest.mark.parametrize("factor", [2.0, 1.3, 0.25])
def test_exactly_capacity_tokens_per_expert_per_pool(pool, group, n, factor):
    torch.manual_seed(0)
    e = 4
    r = pool_expert_choice(torch.randn(n, T, e), factor, pool, group)
    sizes = pool_sizes(pool, group, n, T)
    assert len(r.token_index) == pool_assignments(factor, sizes, e)
    start = 0
    for size in sizes:
        cap = expert_capacity(factor, size, e)
        assert cap == max(1, min(size, math.ceil(factor * size / e)))  # ceil(factor·P/E), clipped to [1, P]
        in_pool = (r.token_index >= start) & (r.token_index < start + size)
        for expert in range(e):
            tokens = r.token_index[in_pool & (r.expert_index == expert)]
            assert len(tokens) == cap and len(tokens.unique()) == cap
        start += size
    assert start == n * T
    assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_index, minlength=e))


def test_batch_pool_capacity_is_of_the_whole_micro_batch():
    """16 tokens, 4 experts, factor 1.3: per sample C = ceil(5.2) = 6, per 4-sample batch C = ceil(20.8) = 21."""
    r = pool_expert_choice(torch.randn(4, T, 4), 1.3, "batch")
    assert torch.equal(r.tokens_per_expert, torch.full((4,), 21))
    assert torch.equal(pool_expert_choice(torch.randn(4, T, 4), 1.3, "sample").tokens_per_expert,
                       torch.full((4,), 4 * 6))


def test_sample_pool_is_todays_expert_choice_bit_for_bit():
    torch.manual_seed(1)
    logits = torch.randn(3, T, 4)
    new, old = pool_expert_choice(logits, 2.0, "sample"), expert_choice(logits, expert_capacity(2.0, T, 4))
    for name in ("token_index", "expert_index", "weight", "aux_loss", "tokens_per_expert"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name


@pytest.mark.parametrize("n", [3, 4])
def test_group_of_one_sample_equals_per_sample_routing(n):
    x, t, y = inputs(n=n)
    sample = make_model(EC)(x, t, y)
    grouped = make_model(EC.replace(routing_pool="group", routing_group_size=T))(x, t, y)
    assert torch.equal(grouped, sample)


def test_group_pool_over_the_whole_batch_equals_the_batch_pool():
    x, t, y = inputs(n=4)
    batch = make_model(EC.replace(routing_pool="batch"))(x, t, y)
    assert torch.equal(make_model(EC.replace(routing_pool="group", routing_group_size=4 * T))(x, t, y), batch)
    assert torch.equal(make_model(EC.replace(routing_pool="group", routing_group_size=8 * T))(x, t, y), batch)


def assignment_pairs(routing, t: int, order: torch.Tensor | None = None) -> set:
    """{(sample, position, expert, weight)}; ``order`` maps rows to the sample they came from."""
    sample = routing.token_index // t
    if order is not None:
        sample = order[sample]
    return set(zip(sample.tolist(), (routing.token_index % t).tolist(), routing.expert_index.tolist(),
                   routing.weight.tolist()))


def test_batch_pool_permuting_samples_permutes_assignments_and_outputs():
    """A sample's routing depends on its micro-batch only as a set: reordering the samples' scores reorders the
    assignments exactly (random scores: no ties); through the model, the outputs are reordered to float rounding
    (a token's row moves within the batched GEMMs, whose blocking can round a row differently elsewhere)."""
    torch.manual_seed(0)
    perm = torch.tensor([3, 0, 4, 2, 1])
    logits = torch.randn(5, T, EC.num_experts)
    before = pool_expert_choice(logits, EC.capacity_factor, "batch")
    after = pool_expert_choice(logits[perm], EC.capacity_factor, "batch")
    assert assignment_pairs(after, T, perm) == assignment_pairs(before, T)
    x, t, y = inputs(n=5)
    model = make_model(EC.replace(routing_pool="batch"))
    torch.testing.assert_close(model(x[perm], t[perm], y[perm]), model(x, t, y)[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batch_pool_differs_from_sample_pool_and_depends_on_the_other_samples():
    x, t, y = inputs(n=4)
    batch = make_model(EC.replace(routing_pool="batch"))
    sample = make_model(EC)
    out_batch, out_sample = batch(x, t, y), sample(x, t, y)
    assert (out_batch - out_sample).abs().amax(dim=(1, 2, 3)).min() > 0  # every sample differs
    other = x.clone()
    other[3] = torch.randn_like(other[3])
    assert not torch.equal(batch(other, t, y)[:3], out_batch[:3])  # sample 3 changed the others' routing
    torch.testing.assert_close(sample(other, t, y)[:3], out_sample[:3], rtol=0, atol=1e-6)  # per sample: no


def test_group_pool_permuting_within_a_group_permutes_outputs():
    x, t, y = inputs(n=4)
    model = make_model(EC.replace(routing_pool="group", routing_group_size=2 * T))
    perm = torch.tensor([1, 0, 3, 2])  # within each group of two samples
    assert torch.equal(model(x[perm], t[perm], y[perm]), model(x, t, y)[perm])


@pytest.mark.parametrize("changes", [{}, {"routing_pool": "group", "routing_group_size": 2 * T},
                                     {"routing_pool": "batch"}, {"routing_pool": "batch", "capacity_predictor": True},
                                     {"routing": "token_choice"}])
def test_eval_routes_as_training_without_the_predictor(changes):
    model = make_model(EC.replace(**changes))
    if model.config.capacity_predictor:
        set_capacity_threshold(model, None)  # a predictor model can still route as in training
    x, t, y = inputs(n=5)
    keep = torch.zeros(5, dtype=torch.bool)
    evaluated = model(x, t, y, drop_labels=keep)
    model.train()
    assert torch.equal(model(x, t, y, drop_labels=keep), evaluated)


def predictor_layer(lr: float = 1e-2) -> tuple[MoEFeedForward, torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = MoEFeedForward(EC.replace(routing_pool="batch", capacity_predictor=True, capacity_factor=1.0)).train()
    return layer, torch.randn(8, T, 32), torch.optim.Adam(layer.parameters(), lr=lr)


@pytest.mark.slow
def test_predictor_learns_the_pool_routing_of_a_fixed_batch_and_trains_only_itself():
    layer, x, optimizer = predictor_layer()
    layer(x)
    layer.aux_loss.backward()  # expert choice has no balance loss: aux_loss is the predictor's
    assert layer.gate.weight.grad is None and layer.experts.down_proj.grad is None  # detached tokens
    assert all(p.grad.abs().sum() > 0 for p in layer.capacity_predictor.parameters())
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        layer(x)
        layer.aux_loss.backward()
        optimizer.step()
        losses.append(layer.predictor_loss.item())
    assert losses[0] == pytest.approx(0.69, abs=0.05)  # ln 2: undecided at first
    assert losses[-1] < 0.05 and all(b < a for a, b in zip(losses, losses[1:]))
    # what it learnt: at sampling, threshold 0.5 gives this batch's training routing
    with torch.no_grad():
        train_pairs = {pair[:3] for pair in assignment_pairs(layer.route(x), T)}
        layer.eval()
        predicted = {pair[:3] for pair in assignment_pairs(layer.route(x), T)}
    assert len(train_pairs) == 8 * T and len(train_pairs ^ predicted) <= 0.05 * len(train_pairs)


@pytest.mark.slow
def test_predictor_loss_falls_while_the_router_and_experts_train_alongside():
    layer, x, optimizer = predictor_layer(lr=3e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        out = layer(x)
        (out.square().mean() + layer.aux_loss).backward()  # the routing it predicts moves as the router trains
        optimizer.step()
        losses.append(layer.predictor_loss.item())
    base_rate = 0.5623  # cross-entropy of predicting the rate of assignments, 1/4, everywhere
    assert losses[0] == pytest.approx(0.69, abs=0.05) and losses[-1] < 0.7 * base_rate


@pytest.mark.slow
def test_predictor_loss_is_part_of_the_model_aux_loss():
    model = make_model(EC.replace(capacity_predictor=True, capacity_predictor_weight=0.5)).train()
    x, t, y = inputs()
    model(x, t, y)
    layers = model.moe_layers()
    assert all(layer.predictor_loss > 0 for layer in layers)
    expected = sum(0.5 * layer.predictor_loss for layer in layers)
    torch.testing.assert_close(model.balance_loss(), expected)
    model.eval()
    model(x, t, y)
    assert model.balance_loss().item() == 0.0 and all(layer.predictor_loss is None for layer in layers)


def test_threshold_choice_higher_threshold_keeps_a_subset():
    torch.manual_seed(2)
    logits, predicted = torch.randn(40, 4), torch.randn(40, 4)
    previous = None
    for threshold in (0.0, 0.2, 0.5, 0.8, 1.0):
        r = threshold_choice(logits, predicted, threshold)
        pairs = set(zip(r.token_index.tolist(), r.expert_index.tolist()))
        assert pairs == {(i, j) for i in range(40) for j in range(4) if predicted[i, j].sigmoid() > threshold}
        torch.testing.assert_close(r.weight, logits.softmax(-1)[r.token_index, r.expert_index])
        assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_index, minlength=4))
        assert previous is None or pairs <= previous
        previous = pairs
    assert not previous  # threshold 1: no assignment


def counted_flops(model, x, t, y) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA: counted bmm
        model(x, t, y)
    return counter.get_total_flops()


@pytest.mark.slow
def test_threshold_moves_measured_assignments_and_flops_monotonically():
    config = EC.replace(capacity_predictor=True, routing_pool="batch")
    model = make_model(config)
    x, t, y = inputs(n=3)
    results = []
    for threshold in (0.0, 0.45, 0.48, 0.5, 0.52, 0.55, 1.0):
        set_capacity_threshold(model, threshold)
        measured = activated_compute(model, x, t, y)
        assert measured.flops == pytest.approx(counted_flops(model, x, t, y), rel=1e-9)
        results.append(measured)
    assignments = [r.assignments for r in results]
    flops = [r.flops for r in results]
    assert assignments[0] == 3 * T * config.num_experts * len(model.moe_layers())  # threshold 0: every expert
    assert assignments[-1] == 0
    assert all(a > b for a, b in zip(assignments, assignments[1:]))  # strictly fewer with every step here
    assert all(a > b for a, b in zip(flops, flops[1:]))
    per_assignment = 2 * config.expert_matrices * config.expert_hidden * config.hidden_size
    assert flops[0] - flops[-1] == pytest.approx(assignments[0] * per_assignment)
    for r in results:
        assert [c.shape for c in r.experts_per_token] == [(3, T)] * len(model.moe_layers())
        assert sum(int(c.sum()) for c in r.experts_per_token) == r.assignments
    assert results[0].mean_experts_per_token == config.num_experts


@pytest.mark.parametrize("changes,n", [({}, 3), ({"routing_pool": "group", "routing_group_size": 2 * T}, 3),
                                       ({"routing_pool": "batch", "capacity_factor": 1.3}, 3),
                                       ({"routing_pool": "batch", "capacity_predictor": True}, 2),
                                       ({"routing": "token_choice"}, 2)])
@pytest.mark.slow
def test_activated_compute_of_the_training_routing_matches_the_card_and_counted_flops(changes, n):
    config = EC.replace(**changes)
    model = make_model(config)
    if config.capacity_predictor:
        model.train()  # the predictor runs in training too (its loss): counted in the card
    x, t, y = inputs(config, n=n)
    kwargs = {"drop_labels": torch.zeros(n, dtype=torch.bool)}
    measured = activated_compute(model, x, t, y, **kwargs)
    expected = n * (linear_macs(config, n) + attention_macs(config))
    assert measured.macs + n * attention_macs(config) == pytest.approx(expected, rel=1e-9)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x, t, y, **kwargs)
    assert measured.flops == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_card_counts_the_predictor_parameters():
    config = EC.replace(capacity_predictor=True)
    model = DiT(config)
    params = count_parameters(config)
    assert params["total"] == sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    d, e = config.hidden_size, config.num_experts
    assert params["total"] - count_parameters(EC)["total"] == len(model.moe_layers()) * (d * d + d + d * e + e)


def test_set_capacity_threshold():
    model = make_model(EC.replace(capacity_predictor=True, capacity_threshold=0.7))
    assert all(layer.capacity_threshold == 0.7 for layer in model.moe_layers())
    assert set_capacity_threshold(model, 0.2) == len(model.moe_layers())
    assert all(layer.capacity_threshold == 0.2 for layer in model.moe_layers())
    with pytest.raises(ValueError, match=r"capacity_threshold=1.5 must be in \[0, 1\]"):
        set_capacity_threshold(model, 1.5)
    with pytest.raises(ValueError, match="no capacity predictor"):
        set_capacity_threshold(make_model(EC), 0.5)


def test_threshold_one_routes_no_token_and_keeps_the_shared_experts():
    model = make_model(EC.replace(capacity_predictor=True))
    set_capacity_threshold(model, 1.0)
    x, t, y = inputs(n=2)
    out = model(x, t, y)
    assert torch.isfinite(out).all() and torch.count_nonzero(out) > 0
    assert all(int(layer.expert_counts.sum()) == 0 for layer in model.moe_layers())


def test_old_config_dicts_load_with_todays_routing():
    old = {k: v for k, v in EC.to_dict().items() if k not in NEW_KEYS}
    loaded = DiTConfig.from_dict(old)
    assert loaded == EC
    assert (loaded.routing_pool, loaded.routing_group_size, loaded.capacity_predictor) == ("sample", 0, False)
    pooled = EC.replace(routing_pool="group", routing_group_size=2 * T, capacity_predictor=True)
    assert DiTConfig.from_dict(pooled.to_dict()) == pooled


@pytest.mark.parametrize("changes,message", [
    ({"routing_pool": "global"}, r"routing_pool='global' is not one of \('sample', 'group', 'batch'\)"),
    ({"routing_pool": "group"}, "routing_group_size=0 must be a positive multiple of the 16 image tokens"),
    ({"routing_pool": "group", "routing_group_size": 24}, "routing_group_size=24 must be a positive multiple"),
    ({"routing_pool": "group", "routing_group_size": -16}, "routing_group_size=-16 must be a positive multiple"),
    ({"routing_group_size": 32}, "routing_group_size=32 is only used with routing_pool='group'"),
    ({"routing_pool": "batch", "routing": "token_choice"}, "routing_pool='batch' needs routing='expert_choice'"),
    ({"capacity_predictor": True, "routing": "token_choice"}, "capacity_predictor=True needs routing='expert_choice'"),
    ({"capacity_threshold": 1.5}, r"capacity_threshold=1.5 must be in \[0, 1\]"),
    ({"capacity_threshold": float("nan")}, r"capacity_threshold=nan must be in \[0, 1\]"),
    ({"capacity_predictor_weight": -1.0}, "capacity_predictor_weight=-1.0 must be >= 0"),
])
def test_bad_routing_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        EC.replace(**changes)

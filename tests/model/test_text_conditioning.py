"""Text-conditioned DiT (EC-DiT): captions, cross-attention, grouped-query attention, GELU experts, presets."""

import math

import pytest
import torch
import torch.nn.functional as F
from random_weights import randomized
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditmoe.model import DiT, get_preset
from ditmoe.model.attention import Attention, CrossAttention
from ditmoe.model.card import attention_macs, count_parameters, linear_macs, model_card
from ditmoe.model.conditioning import Caption
from ditmoe.model.config import DiTConfig
from ditmoe.model.embeddings import masked_mean
from ditmoe.model.mlp import GeluMLP
from ditmoe.model.moe import GroupedExperts, MoEFeedForward
from ditmoe.model.presets import T5_V1_1_XXL, text_encoder_of
from ditmoe.model.routing import expert_capacity
from ditmoe.parallel.activation_checkpointing import apply_activation_checkpointing

TINY = get_preset("EC-DiT-tiny")
NEW_KEYS = ("text_dim", "text_len", "num_kv_heads", "expert_activation", "pooled_text")


def make_model(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return randomized(DiT(config), seed).eval()


def inputs(config: DiTConfig = TINY, n: int = 3, seed: int = 1, length: int | None = None):
    """Latents, timesteps and captions whose i-th sample has 3 + i real tokens (the rest padding)."""
    gen = torch.Generator().manual_seed(seed)
    length = length or config.text_len
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.tensor([10, 500, 990][:n])
    tokens = torch.randn(n, length, config.text_dim, generator=gen)
    mask = torch.arange(length)[None] < (3 + torch.arange(n))[:, None]  # (N, L)
    return x, t, Caption(tokens, mask)


def test_tiny_preset_is_the_briefed_ec_dit():
    c = TINY
    assert (c.hidden_size, c.depth, c.num_heads, c.num_kv_heads, c.num_experts) == (32, 2, 4, 2, 4)
    assert (c.text_dim, c.text_len, c.input_size, c.patch_size, c.in_channels) == (16, 8, 8, 2, 4)
    assert (c.routing, c.expert_activation, c.moe_placement, c.num_shared_experts) == (
        "expert_choice", "gelu", "every_other", 0)


@pytest.mark.parametrize("size,layers,hidden,heads,kv_heads", [
    ("XL", 28, 1152, 18, 6), ("XXL", 38, 1536, 24, 6), ("3XL", 42, 2304, 36, 6), ("M", 38, 3072, 48, 12)])
@pytest.mark.parametrize("experts", [8, 16, 32, 64])
def test_ec_dit_presets(size, layers, hidden, heads, kv_heads, experts):
    c = get_preset(f"EC-DiT-{size}-{experts}E")
    assert (c.depth, c.hidden_size, c.num_heads, c.num_kv_heads, c.num_experts) == (layers, hidden, heads, kv_heads,
                                                                                    experts)
    assert (c.routing, c.capacity_factor, c.moe_placement, c.expert_activation) == (
        "expert_choice", 2.0, "every_other", "gelu")
    assert (c.expert_ratio, c.num_shared_experts, c.learn_sigma, c.text_dim, c.text_len) == (4.0, 0, False, 4096, 120)
    assert (c.input_size, c.patch_size, c.in_channels) == (32, 2, 4)
    assert text_encoder_of(f"EC-DiT-{size}-{experts}E") is T5_V1_1_XXL


@pytest.mark.parametrize("changes", [{}, {"pooled_text": True}, {"learn_sigma": True}, {"num_kv_heads": 0},
                                     {"num_experts": 0}, {"expert_activation": "swiglu", "num_shared_experts": 1}])
def test_forward_shapes(changes):
    config = TINY.replace(**changes)
    x, t, caption = inputs(config)
    out = make_model(config)(x, t, caption)
    assert out.shape == (3, config.out_channels, 8, 8) and torch.isfinite(out).all()


def test_zero_initialised_output_and_cross_attention():
    model = DiT(TINY)
    x, t, caption = inputs()
    assert torch.count_nonzero(model(x, t, caption)) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.cross_attn.proj.weight) == 0


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.slow
def test_padding_tokens_change_nothing(pooled):
    """Other embeddings at the padded positions, and more padding tokens appended: the same output."""
    config = TINY.replace(pooled_text=pooled)
    model = make_model(config)
    x, t, caption = inputs(config)
    reference = model(x, t, caption)
    gen = torch.Generator().manual_seed(7)
    noisy = torch.where(caption.mask[..., None], caption.tokens, torch.randn(caption.tokens.shape, generator=gen))
    extra = torch.randn(3, 5, config.text_dim, generator=gen)
    longer = Caption(torch.cat([noisy, extra], 1), torch.cat([caption.mask, torch.zeros(3, 5, dtype=torch.bool)], 1))
    torch.testing.assert_close(model(x, t, Caption(noisy, caption.mask)), reference, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t, longer), reference, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_short_captions_are_padded_to_text_len():
    model = make_model()
    x, t, caption = inputs(length=TINY.text_len)
    short = Caption(caption.tokens[:, :6], caption.mask[:, :6])  # every sample has at most 5 real tokens
    torch.testing.assert_close(model(x, t, short), model(x, t, caption), rtol=0, atol=1e-6)


def test_dropped_captions_equal_the_null_caption_path():
    model = make_model()
    x, t, caption = inputs()
    null = model.y_embedder.null_caption.detach()
    null_caption = Caption(null.expand(3, -1, -1), torch.ones(3, TINY.text_len, dtype=torch.bool))
    dropped = model(x, t, caption, drop_labels=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(dropped, model(x, t, null_caption), rtol=0, atol=0)
    conditioned = model(x, t, caption)
    assert (dropped - conditioned).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample differs
    mixed = model(x, t, caption, drop_labels=torch.tensor([True, False, True]))
    torch.testing.assert_close(mixed[1], conditioned[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[[0, 2]], dropped[[0, 2]], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_caption_dropout_is_drawn_only_in_training():
    model = make_model(TINY.replace(class_dropout_prob=1.0))
    x, t, caption = inputs()
    null = model(x, t, caption, drop_labels=torch.ones(3, dtype=torch.bool))
    conditioned = model(x, t, caption)
    model.train()
    torch.testing.assert_close(model(x, t, caption), null, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(x, t, caption), conditioned, rtol=0, atol=0)


def test_no_null_caption_without_dropout():
    model = make_model(TINY.replace(class_dropout_prob=0.0))
    assert model.y_embedder.null_caption is None
    x, t, caption = inputs()
    model.train()
    assert model(x, t, caption).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="no null caption"):
        model(x, t, caption, drop_labels=torch.ones(3, dtype=torch.bool))


def test_caption_without_tokens_adds_exactly_nothing():
    layer = randomized(CrossAttention(32, 4, num_kv_heads=2))
    x, context = torch.randn(2, 16, 32), torch.randn(2, 8, 32)
    mask = torch.tensor([[True] * 3 + [False] * 5, [False] * 8])
    out = layer(x, context, mask)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0]) > 0


def reference_attention(q, k, v, mask=None):
    """q (N, H, T, hd), k/v (N, H_kv, S, hd): KV heads repeated, explicit softmax. mask (N, S) True = attend."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (N, T, H*hd)


def heads(x, num):
    return x.reshape(x.shape[0], x.shape[1], num, -1).transpose(1, 2)


def test_mha_keeps_the_fused_qkv_layout_and_equals_the_split_layout():
    names = {n for n, _ in DiT(get_preset("tiny")).named_parameters()}
    assert "blocks.0.attn.qkv.weight" in names and not any(".attn.q." in n or ".attn.kv." in n for n in names)
    assert not any("cross_attn" in n for n in names)
    torch.manual_seed(0)
    fused = randomized(Attention(32, 4, qk_norm=True))
    split = Attention(32, 4, qk_norm=True, num_kv_heads=4, fused_qkv=False)
    with torch.no_grad():
        split.q.weight.copy_(fused.qkv.weight[:32])
        split.q.bias.copy_(fused.qkv.bias[:32])
        split.kv.weight.copy_(fused.qkv.weight[32:])
        split.kv.bias.copy_(fused.qkv.bias[32:])
        for name in ("q_norm", "k_norm", "proj"):
            getattr(split, name).load_state_dict(getattr(fused, name).state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(split(x), fused(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_self_attention_matches_reference(kv_heads):
    layer = randomized(Attention(32, 4, num_kv_heads=kv_heads, fused_qkv=False))
    assert layer.kv.weight.shape == (2 * kv_heads * 8, 32)
    x = torch.randn(2, 16, 32)
    k, v = layer.kv(x).chunk(2, dim=-1)
    ref = layer.proj(reference_attention(heads(layer.q(x), 4), heads(k, kv_heads), heads(v, kv_heads)))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_cross_attention_matches_reference(kv_heads):
    layer = randomized(CrossAttention(32, 4, num_kv_heads=kv_heads))
    x, context = torch.randn(3, 16, 32), torch.randn(3, 8, 32)
    mask = torch.arange(8)[None] < torch.tensor([1, 5, 8])[:, None]
    k, v = layer.kv(context).chunk(2, dim=-1)
    ref = layer.proj(reference_attention(heads(layer.q(x), 4), heads(k, kv_heads), heads(v, kv_heads), mask))
    torch.testing.assert_close(layer(x, context, mask), ref, rtol=1e-5, atol=1e-6)


def test_expert_choice_routes_only_image_tokens_exactly_capacity_per_expert():
    model = make_model()
    (moe,) = model.moe_layers()
    seen = []
    moe.register_routing_hook(lambda module, routing, shape: seen.append((routing, shape)))
    x, t, caption = inputs()
    model(x, t, caption)
    (routing, (n, tokens)), = seen
    assert (n, tokens) == (3, TINY.num_tokens)  # image tokens only, not + text_len
    cap = expert_capacity(TINY.capacity_factor, tokens, TINY.num_experts)
    assert cap == tokens * 2 // TINY.num_experts
    assert torch.equal(routing.tokens_per_expert, torch.full((TINY.num_experts,), n * cap))
    assert routing.token_index.max() < n * tokens
    for sample in range(n):
        for expert in range(TINY.num_experts):
            chosen = routing.token_index[(routing.expert_index == expert) & (routing.token_index // tokens == sample)]
            assert len(chosen) == cap and len(chosen.unique()) == cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_experts_match_per_expert_loop(dtype):
    """Grouped GEMMs with GELU against autograd through a Python loop of per-expert FFNs in fp32."""
    torch.manual_seed(5)
    experts = GroupedExperts(4, 32, 128, activation="gelu").to(dtype)
    assert experts.up_proj.shape == (4, 128, 32) and experts.down_proj.shape == (4, 32, 128)
    assert not hasattr(experts, "gate_up_proj")
    counts = torch.tensor([3, 0, 5, 2])  # an expert without tokens too
    x = torch.randn(10, 32, dtype=dtype, requires_grad=True)
    y = experts(x, counts)
    grad = torch.randn_like(y)
    y.backward(grad)
    w1 = experts.up_proj.detach().float().requires_grad_(True)
    w2 = experts.down_proj.detach().float().requires_grad_(True)
    x2 = x.detach().float().requires_grad_(True)
    ref = torch.cat([F.gelu(chunk @ w1[e].t(), approximate="tanh") @ w2[e].t()
                     for e, chunk in enumerate(x2.split(counts.tolist()))])
    ref.backward(grad.float())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), x2.grad, **tol)
    torch.testing.assert_close(experts.up_proj.grad.float(), w1.grad, **tol)
    torch.testing.assert_close(experts.down_proj.grad.float(), w2.grad, **tol)
    assert experts.up_proj.grad[1].abs().sum() == 0


def test_gelu_moe_layer_with_shared_experts_matches_naive_reference():
    torch.manual_seed(6)
    layer = MoEFeedForward(TINY.replace(num_shared_experts=1))
    assert isinstance(layer.shared_experts, GeluMLP) and layer.shared_experts.fc1.bias is None
    x = torch.randn(2, 16, 32)
    flat, r = x.reshape(-1, 32), layer.route(x)
    ref = layer.shared_experts.fc2(F.gelu(layer.shared_experts.fc1(flat), approximate="tanh"))
    for tok, exp, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()):
        h = F.gelu(layer.experts.up_proj[exp] @ flat[tok], approximate="tanh")
        ref[tok] += w * (layer.experts.down_proj[exp] @ h)
    torch.testing.assert_close(layer(x), ref.reshape(2, 16, 32), rtol=1e-5, atol=1e-5)


def conditioning_of(model: DiT, x, t, caption) -> torch.Tensor:
    """The c (N, D) the blocks receive."""
    seen = []
    handle = model.blocks[0].adaLN_modulation.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    model(x, t, caption)
    handle.remove()
    return seen[0]


def test_pooled_text_adds_the_pooled_caption_to_c():
    x, t, caption = inputs()
    plain = make_model()
    torch.testing.assert_close(conditioning_of(plain, x, t, caption), plain.t_embedder(t), rtol=0, atol=0)
    model = make_model(TINY.replace(pooled_text=True))
    emb = model.y_embedder
    c = conditioning_of(model, x, t, caption)
    expected = model.t_embedder(t) + emb.pool(masked_mean(emb.y_proj(caption.tokens), caption.mask))
    torch.testing.assert_close(c, expected, rtol=1e-6, atol=1e-6)
    assert (c - model.t_embedder(t)).abs().min() > 0
    other = Caption(caption.tokens.flip(0), caption.mask)
    assert not torch.allclose(conditioning_of(model, x, t, other), c)


def test_config_dicts_round_trip_and_old_dicts_load():
    old = {k: v for k, v in get_preset("tiny").to_dict().items() if k not in NEW_KEYS}
    loaded = DiTConfig.from_dict(old)
    assert loaded == get_preset("tiny")
    assert (loaded.text_dim, loaded.num_kv_heads, loaded.expert_activation, loaded.pooled_text) == (0, 0, "swiglu",
                                                                                                   False)
    assert DiTConfig.from_dict(TINY.to_dict()) == TINY


@pytest.mark.parametrize("changes,message", [
    ({"text_dim": 16}, "text_len=0 and text_dim=16 must both be > 0"),
    ({"text_len": 8}, "text_len=8 and text_dim=0 must both be > 0"),
    ({"text_dim": -1, "text_len": 8}, "text_dim must be >= 0"),
    ({"num_kv_heads": 3}, "num_kv_heads=3 must be 0 .* divide num_heads=16"),
    ({"num_kv_heads": -2}, "num_kv_heads=-2"),
    ({"expert_activation": "relu"}, "expert_activation='relu' is not one of"),
    ({"pooled_text": True}, "pooled_text=True needs a text-conditioned model"),
])
def test_bad_config_values_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**changes)


def test_wrong_condition_kind_is_a_clear_error():
    x, t, caption = inputs()
    with pytest.raises(TypeError, match="text-conditioned .* expects y to be a Caption"):
        DiT(TINY)(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="class-conditional .* expects y to be a tensor of"):
        DiT(get_preset("tiny"))(x, t, caption)
    with pytest.raises(ValueError, match=r"caption tokens of shape \(3, 8, 5\) do not match"):
        DiT(TINY)(x, t, Caption(caption.tokens[..., :5], caption.mask))
    with pytest.raises(ValueError, match="caption mask of shape"):
        DiT(TINY)(x, t, Caption(caption.tokens, caption.mask[:, :4]))


@pytest.mark.slow
def test_tiny_preset_trains_one_step():
    """Rectified flow: x_t = (1 - s) x0 + s ε, the model predicts ε - x0; one AdamW step, plain torch."""
    torch.manual_seed(0)
    model = DiT(TINY).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, _, caption = inputs(n=3)
    noise, s = torch.randn_like(x0), torch.rand(3)
    xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise

    def loss_fn():
        return F.mse_loss(model(xt, s * 1000, caption, drop_labels=torch.tensor([True, False, False])), noise - x0)

    loss = loss_fn()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.isfinite(loss_fn())


def test_activation_checkpointing_of_text_blocks_keeps_gradients():
    def grads(every):
        model = make_model()
        model.train()
        apply_activation_checkpointing(model, every)
        x, t, caption = inputs()
        model(x, t, caption, drop_labels=torch.tensor([False, True, False])).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    reference, checkpointed = grads(0), grads(1)
    for name, g in checkpointed.items():
        assert torch.equal(g, reference[name]), name


def test_card_counts_the_real_model_and_its_flops():
    config = TINY.replace(pooled_text=True, num_shared_experts=1)
    model = DiT(config).eval()
    params = count_parameters(config)
    assert params["total"] == sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    idle_experts = config.num_experts - config.num_experts * expert_capacity(2.0, 16, 4) / 16
    assert params["total"] - params["activated"] == idle_experts * 2 * config.expert_hidden * 32
    x, t, caption = inputs(config, n=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, caption)
    assert counter.get_total_flops() == pytest.approx(2 * (linear_macs(config) + attention_macs(config)), rel=1e-6)


def test_card_of_an_ec_dit_preset_lists_the_text_encoder_apart():
    config = get_preset("EC-DiT-XL-8E")
    card = model_card(config, text_encoder_of("EC-DiT-XL-8E"))
    assert card["text_encoder"] == "T5-v1.1-XXL encoder, 4.76B parameters"
    assert card["text_encoder_params_M"] == pytest.approx(4762.31, abs=0.01)
    assert card["params_total_M"] < 2000  # the encoder is not in the totals
    caption_projection = (4096 * 1152 + 1152) + (1152 * 1152 + 1152) + 120 * 4096  # y_proj + null caption
    cross_attention = 28 * (2 * (1152 * 1152 + 1152) + 1152 * 2 * 384 + 2 * 384)
    label_table = 1001 * 1152  # what the class-conditional variant has instead
    without_text = model_card(config.replace(text_dim=0, text_len=0))
    assert (card["params_total_M"] - without_text["params_total_M"]) * 1e6 == pytest.approx(
        caption_projection + cross_attention - label_table)

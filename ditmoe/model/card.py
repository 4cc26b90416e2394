"""Parameter and FLOP accounting of a config, on the meta device (never allocates real weights).

Text-conditioned models count their caption projection (and null caption, pooled-caption MLP) and the
cross-attention of every block, with captions of ``text_len`` tokens (they are always padded to it). The
frozen text encoder is not part of the model: its size is reported apart (``text_encoder``).

Expert choice's routed compute is counted for a micro-batch of ``batch_size`` samples (default 1), whose
routing pools (``config.routing_pool``) fix the capacities; a capacity predictor's sampling-time routing
depends on the data: :func:`activated_compute` measures it on a forward pass."""

from dataclasses import dataclass

import torch

from .config import DiTConfig
from .dit import DiT
from .presets import TextEncoder
from .routing import pool_assignments, pool_sizes


def experts_per_token(config: DiTConfig, batch_size: int = 1) -> float:
    """Average routed experts a token goes through: k for token choice; for expert choice Σ_pools E·C/(N·T),
    the assignments of a micro-batch of N = ``batch_size`` samples over its tokens (E·C/T with per-sample
    pools, whatever N); 0 if dense."""
    if not config.is_moe:
        return 0.0
    if config.routing == "expert_choice":
        t = config.num_tokens
        sizes = pool_sizes(config.routing_pool, config.routing_group_size, batch_size, t)
        return pool_assignments(config.capacity_factor, sizes, config.num_experts) / (batch_size * t)
    return float(config.top_k)


def expert_macs_per_assignment(config: DiTConfig) -> int:
    """Multiply-accumulates of one routed expert on one token: expert_matrices · F · D."""
    return config.expert_matrices * config.expert_hidden * config.hidden_size


def predictor_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one MoE layer's capacity predictor on one token (D·D + D·E; 0 without one)."""
    d = config.hidden_size
    return d * d + d * config.num_experts if config.capacity_predictor and config.is_moe else 0


def count_parameters(config: DiTConfig) -> dict[str, float]:
    """Total and activated parameters (the fixed positional table counted, as the paper does)."""
    with torch.device("meta"):
        model = DiT(config)
    total = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    per_expert = config.expert_matrices * config.expert_hidden * config.hidden_size
    idle = (config.num_experts - experts_per_token(config)) * per_expert * len(model.moe_layers())
    return {"total": total, "activated": total - idle}


def caption_macs(config: DiTConfig) -> float:
    """Multiply-accumulates of the caption projection (text_len tokens) and the pooled-caption MLP."""
    d = config.hidden_size
    macs = config.text_len * (config.text_dim * d + d * d)
    return macs + (2 * d * d if config.pooled_text else 0)


def attention_projection_macs(config: DiTConfig) -> float:
    """Multiply-accumulates of one block's attention projections: self-attention q, k, v, output and, for
    text models, cross-attention q and output on the image tokens and k, v on the caption tokens."""
    d, t, kv = config.hidden_size, config.num_tokens, config.kv_heads * config.head_dim
    macs = t * (2 * d * d + 2 * d * kv)
    if config.is_text:
        macs += t * 2 * d * d + config.text_len * 2 * d * kv
    return macs


def linear_macs(config: DiTConfig, batch_size: int = 1) -> float:
    """Multiply-accumulates of all linear layers (patch embedding included) for one image, routed experts as
    in training for a micro-batch of ``batch_size`` samples (:func:`experts_per_token`); a capacity predictor
    counts in every MoE layer."""
    d, t, p = config.hidden_size, config.num_tokens, config.patch_size
    macs = t * p * p * config.in_channels * d  # patch embedding
    macs += 256 * d + d * d  # timestep MLP
    macs += caption_macs(config) if config.is_text else 0
    for i in range(config.depth):
        macs += 6 * d * d + attention_projection_macs(config)  # adaLN, attention projections
        if config.moe_in_block(i):
            macs += t * d * config.num_experts  # router
            macs += experts_per_token(config, batch_size) * t * expert_macs_per_assignment(config)
            macs += t * predictor_macs(config)
            macs += t * config.expert_matrices * config.shared_hidden * d
        else:
            macs += 2 * t * d * int(config.mlp_ratio * d)
    macs += 2 * d * d + t * d * p * p * config.out_channels  # final adaLN and projection
    return macs


def attention_macs(config: DiTConfig) -> float:
    """Multiply-accumulates of the attention scores (QKᵀ) and their application to V for one image:
    self-attention over the T image tokens and, for text models, cross-attention to the text_len tokens."""
    keys = config.num_tokens + (config.text_len if config.is_text else 0)
    return config.depth * 2 * config.num_tokens * keys * config.hidden_size


def model_card(config: DiTConfig, text_encoder: TextEncoder | None = None) -> dict:
    """Parameters and forward FLOPs of one image; ``text_encoder`` (the frozen encoder the model assumes)
    is listed apart, outside the totals."""
    params = count_parameters(config)
    linear, attention = linear_macs(config), attention_macs(config)
    card = {
        "params_total_M": params["total"] / 1e6,
        "params_activated_M": params["activated"] / 1e6,
        "latent_shape": [config.in_channels, config.input_size, config.input_size],
        "tokens": config.num_tokens,
        "gflops_paper": linear / 1e9,  # linear-layer MACs: the convention of the DiT-MoE table
        "gmacs_with_attention": (linear + attention) / 1e9,  # the convention of DiT's own table
        "gflops_full": 2 * (linear + attention) / 1e9,  # 2 FLOPs per MAC, attention scores included
    }
    if config.is_text:
        card["text_tokens"] = config.text_len
        card["text_encoder"] = str(text_encoder) if text_encoder else None  # not in the totals above
        card["text_encoder_params_M"] = text_encoder.params / 1e6 if text_encoder else None
    return card


@dataclass
class ActivatedCompute:
    """Routed compute of one forward pass of N samples, as measured (:func:`activated_compute`)."""

    experts_per_token: list[torch.Tensor]  # per MoE layer: (N, T) int64, the experts that took each image token
    assignments: int  # routed (token, expert) assignments, all MoE layers together
    routed_macs: float  # multiply-accumulates of the routed experts: assignments · expert_macs_per_assignment
    macs: float  # all linear-layer multiply-accumulates of the forward, routed experts as measured
    flops: float  # 2 · (macs + attention multiply-accumulates): the forward's FLOPs

    @property
    def mean_experts_per_token(self) -> float:
        """Assignments per image token and MoE layer."""
        tokens = sum(c.numel() for c in self.experts_per_token)
        return self.assignments / tokens if tokens else 0.0


def activated_compute(model: DiT, x: torch.Tensor, t: torch.Tensor, y, **kwargs) -> ActivatedCompute:
    """Run ``model(x, t, y, **kwargs)`` without gradients and report the expert assignments it made and its
    FLOPs: :func:`linear_macs` (routed experts as in training, for this batch size) with the routed experts
    replaced by the assignments made. In eval mode with a capacity predictor, the assignments follow
    its threshold (``set_capacity_threshold``): a higher threshold gives fewer assignments and FLOPs."""
    config = model.config
    layers = model.moe_layers()
    seen: list[torch.Tensor | None] = [None] * len(layers)

    def record(index, module, routing, shape):
        n, tokens = shape
        counts = torch.zeros(n * tokens, dtype=torch.int64, device=routing.token_index.device)
        counts.index_add_(0, routing.token_index, torch.ones_like(routing.token_index))
        seen[index] = counts.view(n, tokens).cpu()

    handles = [layer.register_routing_hook(lambda m, r, s, i=i: record(i, m, r, s)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(x, t, y, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in seen):
        raise RuntimeError("an MoE layer did not route during the forward")
    n = x.shape[0]
    assignments = int(sum(int(c.sum()) for c in seen))
    per_assignment = expert_macs_per_assignment(config)
    static = experts_per_token(config, n) * config.num_tokens * n * len(layers)  # the training routing's
    macs = n * linear_macs(config, n) + (assignments - static) * per_assignment
    return ActivatedCompute(
        experts_per_token=seen, assignments=assignments, routed_macs=float(assignments * per_assignment),
        macs=float(macs), flops=float(2 * (macs + n * attention_macs(config))),
    )

"""Parameter and FLOP accounting of a config, on the meta device (never allocates real weights).

Text-conditioned models count their caption projection (and null caption, pooled-caption MLP) and the
cross-attention of every block, with captions of ``text_len`` tokens (they are always padded to it). The
frozen text encoder is not part of the model: its size is reported apart (``text_encoder``)."""

import torch

from .config import DiTConfig
from .dit import DiT
from .presets import TextEncoder
from .routing import expert_capacity


def experts_per_token(config: DiTConfig) -> float:
    """Average routed experts a token goes through: k for token choice, E·C/T for expert choice (0 if dense)."""
    if not config.is_moe:
        return 0.0
    if config.routing == "expert_choice":
        capacity = expert_capacity(config.capacity_factor, config.num_tokens, config.num_experts)
        return config.num_experts * capacity / config.num_tokens
    return float(config.top_k)


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


def linear_macs(config: DiTConfig) -> float:
    """Multiply-accumulates of all linear layers (patch embedding included) for one image."""
    d, t, p = config.hidden_size, config.num_tokens, config.patch_size
    macs = t * p * p * config.in_channels * d  # patch embedding
    macs += 256 * d + d * d  # timestep MLP
    macs += caption_macs(config) if config.is_text else 0
    for i in range(config.depth):
        macs += 6 * d * d + attention_projection_macs(config)  # adaLN, attention projections
        if config.moe_in_block(i):
            macs += t * d * config.num_experts  # router
            macs += experts_per_token(config) * t * config.expert_matrices * config.expert_hidden * d
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

"""Parameter and FLOP accounting of a config, on the meta device (never allocates real weights)."""

import torch

from .config import DiTConfig
from .dit import DiT
from .routing import expert_capacity


def experts_per_token(config: DiTConfig) -> float:
    """Average routed experts a token goes through: k for token choice, E·C/T for expert choice."""
    if config.routing == "expert_choice":
        capacity = expert_capacity(config.capacity_factor, config.num_tokens, config.num_experts)
        return config.num_experts * capacity / config.num_tokens
    return float(config.top_k)


def count_parameters(config: DiTConfig) -> dict[str, float]:
    """Total and activated parameters (the fixed positional table counted, as the paper does)."""
    with torch.device("meta"):
        model = DiT(config)
    total = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    per_expert = 3 * config.expert_hidden * config.hidden_size
    idle = (config.num_experts - experts_per_token(config)) * per_expert * len(model.moe_layers())
    return {"total": total, "activated": total - idle}


def linear_macs(config: DiTConfig) -> float:
    """Multiply-accumulates of all linear layers (patch embedding included) for one image."""
    d, t, p = config.hidden_size, config.num_tokens, config.patch_size
    macs = t * p * p * config.in_channels * d  # patch embedding
    macs += 256 * d + d * d  # timestep MLP
    for i in range(config.depth):
        macs += 6 * d * d + 4 * t * d * d  # adaLN, qkv, attention output
        if config.moe_in_block(i):
            macs += t * d * config.num_experts  # router
            macs += experts_per_token(config) * t * 3 * config.expert_hidden * d
            macs += t * 3 * config.shared_hidden * d
        else:
            macs += 2 * t * d * int(config.mlp_ratio * d)
    macs += 2 * d * d + t * d * p * p * config.out_channels  # final adaLN and projection
    return macs


def attention_macs(config: DiTConfig) -> float:
    """Multiply-accumulates of the attention scores (QKᵀ) and their application to V for one image."""
    return config.depth * 2 * config.num_tokens**2 * config.hidden_size


def model_card(config: DiTConfig) -> dict:
    params = count_parameters(config)
    linear, attention = linear_macs(config), attention_macs(config)
    return {
        "params_total_M": params["total"] / 1e6,
        "params_activated_M": params["activated"] / 1e6,
        "latent_shape": [config.in_channels, config.input_size, config.input_size],
        "tokens": config.num_tokens,
        "gflops_paper": linear / 1e9,  # linear-layer MACs: the convention of the DiT-MoE table
        "gmacs_with_attention": (linear + attention) / 1e9,  # the convention of DiT's own table
        "gflops_full": 2 * (linear + attention) / 1e9,  # 2 FLOPs per MAC, attention scores included
    }

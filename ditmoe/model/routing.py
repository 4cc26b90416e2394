"""Routers: token-choice top-k with DiT-MoE's expert-level balance loss, and EC-DiT's expert choice.

Both return a :class:`Routing`, a flat list of (token, expert, weight) assignments, so one dispatch
serves both. Every shape is fixed by the input's shape (no data-dependent sizes), so routing never
reads a value back to the host and compiles without graph breaks.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    token_index: torch.Tensor  # (A,) int64 row of the flattened (N*T, D) tokens
    expert_index: torch.Tensor  # (A,) int64
    weight: torch.Tensor  # (A,) float32 gate value applied to the expert output
    aux_loss: torch.Tensor  # scalar balance loss (0 for expert choice)
    tokens_per_expert: torch.Tensor  # (E,) int64


def count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert: a scatter-add into E slots (``bincount`` would read its max back)."""
    flat = expert_index.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """Expert-level balance loss α·Σ_i f_i·P_i of DiT-MoE (DeepSeek-MoE).

    probs: (T, E) router softmax; counts: (E,) assignments per expert (``count_per_expert``).
    f_i = E·(assignments to i)/(k·T), P_i = mean_t probs[t, i]; a perfectly balanced router gives α.
    """
    num_tokens, num_experts = probs.shape
    f = counts.to(probs.dtype) * num_experts / (top_k * num_tokens)  # (E,)
    return alpha * (f * probs.mean(0)).sum()


def token_choice(logits: torch.Tensor, top_k: int, normalize: bool, alpha: float) -> Routing:
    """Each token picks its top-k experts by softmax score. logits: (T, E)."""
    num_tokens, num_experts = logits.shape
    probs = logits.float().softmax(dim=-1)  # (T, E)
    weight, expert = probs.topk(top_k, dim=-1)  # (T, k)
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    counts = count_per_expert(expert, num_experts)  # (E,)
    aux = balance_loss(probs, counts, top_k, alpha) if alpha > 0 else probs.new_zeros(())
    token = torch.arange(num_tokens, device=logits.device)[:, None].expand(-1, top_k)  # (T, k)
    return Routing(
        token_index=token.reshape(-1),
        expert_index=expert.reshape(-1),
        weight=weight.reshape(-1),
        aux_loss=aux,
        tokens_per_expert=counts,
    )


def expert_capacity(capacity_factor: float, tokens_per_sample: int, num_experts: int) -> int:
    """C = ceil(capacity_factor · T / E), clipped to [1, T]."""
    return max(1, min(tokens_per_sample, math.ceil(capacity_factor * tokens_per_sample / num_experts)))


def expert_choice(logits: torch.Tensor, capacity: int) -> Routing:
    """Within each sample, every expert takes its top-C tokens by softmax score (EC-DiT). logits: (N, T, E)."""
    n, t, num_experts = logits.shape
    probs = logits.float().softmax(dim=-1)  # (N, T, E)
    weight, token = probs.transpose(1, 2).topk(capacity, dim=-1)  # (N, E, C), token index within sample
    token = token + (torch.arange(n, device=logits.device) * t)[:, None, None]  # (N, E, C) global row
    expert = torch.arange(num_experts, device=logits.device)[None, :, None].expand(n, -1, capacity)
    return Routing(
        token_index=token.reshape(-1),
        expert_index=expert.reshape(-1),
        weight=weight.reshape(-1),
        aux_loss=probs.new_zeros(()),
        tokens_per_expert=torch.full((num_experts,), n * capacity, dtype=torch.int64, device=logits.device),
    )

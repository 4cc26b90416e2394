"""Routers: token-choice top-k with DiT-MoE's expert-level balance loss, EC-DiT's expert choice over routing
pools (one sample, groups of samples, or DiffMoE's whole micro-batch), and DiffMoE's capacity predictor.

All return a :class:`Routing`, a flat list of (token, expert, weight) assignments, so one dispatch
serves all. Every shape of the training routers is fixed by the input's shape (no data-dependent sizes), so
routing never reads a value back to the host and compiles without graph breaks; only the capacity
predictor's sampling-time routing (:func:`threshold_choice`) has a data-dependent number of assignments.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """C = ceil(capacity_factor · T / E), clipped to [1, T], for a routing pool of T tokens (one sample's, or
    a group's or micro-batch's with :func:`pool_expert_choice`)."""
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


def pool_sizes(pool: str, group_size: int, num_samples: int, tokens_per_sample: int) -> list[int]:
    """Tokens of each routing pool of a micro-batch of N samples of T tokens, in order (they add up to N·T).

    'sample': N pools of T. 'batch': one pool of N·T. 'group': pools of ``group_size`` tokens (a multiple of
    T: G/T whole consecutive samples); when N is not a multiple of G/T the remaining samples form one last,
    smaller pool.
    """
    n, t = num_samples, tokens_per_sample
    if pool == "sample":
        return [t] * n
    if pool == "batch":
        return [n * t] if n else []
    if pool != "group":
        raise ValueError(f"routing_pool={pool!r} is not 'sample', 'group' or 'batch'")
    if group_size <= 0 or group_size % t:
        raise ValueError(f"routing_group_size={group_size} must be a positive multiple of the {t} tokens of a sample")
    full, rest = divmod(n * t, group_size)
    return [group_size] * full + ([rest] if rest else [])


def pool_assignments(capacity_factor: float, sizes: list[int], num_experts: int) -> int:
    """Assignments of expert choice over pools of ``sizes`` tokens: E·C(pool) summed over the pools."""
    return sum(num_experts * expert_capacity(capacity_factor, size, num_experts) for size in sizes)


def pool_expert_choice(logits: torch.Tensor, capacity_factor: float, pool: str = "sample",
                       group_size: int = 0) -> Routing:
    """Expert choice over routing pools (:func:`pool_sizes`): in each pool of P tokens every expert takes its
    top-C tokens by softmax score, C = :func:`expert_capacity` (capacity_factor, P, E). logits: (N, T, E).

    'sample' is :func:`expert_choice` per sample, bit for bit. With 'group' or 'batch' a token's experts and
    weights, hence a sample's output, depend on the other samples of its pool as well as on its own: for
    'batch' on the other samples of its micro-batch (which set of samples, not their order), for 'group' on
    the samples its position in the micro-batch puts in its group. Nothing else enters: the softmax is per
    token and a pool only compares its tokens' scores, so permuting the samples within a pool permutes the
    assignments alike, and the outputs with them (as long as no expert sees two tokens of the pool with the
    same score: ``torch.topk`` breaks ties in an unspecified order). At sampling, a classifier-free-guidance
    batch (conditional and null halves together) is one micro-batch.
    """
    n, t, num_experts = logits.shape
    if pool == "sample" or n == 0:
        return expert_choice(logits, expert_capacity(capacity_factor, t, num_experts))
    flat = logits.reshape(n * t, num_experts)
    parts, start = [], 0
    sizes = pool_sizes(pool, group_size, n, t)
    for size, count in _runs(sizes):  # equal pools in one call: at most two calls (full groups, the rest)
        chunk = flat[start:start + size * count].reshape(count, size, num_experts)
        part = expert_choice(chunk, expert_capacity(capacity_factor, size, num_experts))
        part.token_index = part.token_index + start
        parts.append(part)
        start += size * count
    if len(parts) == 1:
        return parts[0]
    return Routing(
        token_index=torch.cat([p.token_index for p in parts]),
        expert_index=torch.cat([p.expert_index for p in parts]),
        weight=torch.cat([p.weight for p in parts]),
        aux_loss=logits.new_zeros((), dtype=torch.float32),
        tokens_per_expert=sum(p.tokens_per_expert for p in parts),
    )


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    """[(size, count)] of consecutive equal sizes."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return runs


def assignment_mask(routing: Routing, num_tokens: int, num_experts: int) -> torch.Tensor:
    """(T, E) float32: 1 where expert e took token t, else 0 (the capacity predictor's targets)."""
    mask = torch.zeros(num_tokens * num_experts, dtype=torch.float32, device=routing.token_index.device)
    flat = routing.token_index * num_experts + routing.expert_index
    return mask.index_fill_(0, flat, 1.0).view(num_tokens, num_experts)


def capacity_predictor_loss(predictor_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Mean binary cross-entropy of the predictor's (T, E) logits against the routing's decisions (detached
    targets: 1 where the expert took the token)."""
    num_tokens, num_experts = predictor_logits.shape
    target = assignment_mask(routing, num_tokens, num_experts).detach()
    return F.binary_cross_entropy_with_logits(predictor_logits.float(), target)


def threshold_choice(logits: torch.Tensor, predictor_logits: torch.Tensor, threshold: float) -> Routing:
    """DiffMoE's sampling-time routing: token t goes to expert e when sigmoid(predictor_logits[t, e]) > threshold,
    weighted by the router's softmax score as in training. logits, predictor_logits: (T, E).

    Each token is routed by itself (no pool: a sample's output does not depend on the other samples), and the
    number of assignments depends on the data (it is read back to the host): eval only. A higher threshold
    keeps a subset of the assignments.
    """
    num_tokens, num_experts = logits.shape
    probs = logits.float().softmax(dim=-1)  # (T, E)
    chosen = predictor_logits.float().sigmoid() > threshold  # (T, E)
    token, expert = chosen.nonzero(as_tuple=True)  # (A,) each, by token then expert
    return Routing(
        token_index=token,
        expert_index=expert,
        weight=probs[token, expert],
        aux_loss=probs.new_zeros(()),
        tokens_per_expert=chosen.sum(0),
    )

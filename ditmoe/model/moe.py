"""Mixture-of-experts feed-forward layer of DiT-MoE.

Layout (DeepSpeed AutoEP detects it): router ``gate = nn.Linear(D, E, bias=False)``; ``experts`` holding
fused SwiGLU weights ``gate_up_proj (E, 2F, D)`` (gate rows first, then up) and ``down_proj (E, D, F)``;
``shared_experts``, a SwiGLU every token goes through.

With ``expert_activation="gelu"`` (EC-DiT) each expert is Linear(D, F) -> GELU(tanh) -> Linear(F, D) without
biases: ``experts.up_proj (E, F, D)`` and ``experts.down_proj (E, D, F)``, and the shared experts are a
bias-free :class:`GeluMLP` (``shared_experts.fc1``/``fc2``). (AutoEP's converters expect ``gate_up_proj``:
they handle only the SwiGLU layout.)

Expert choice routes over a routing pool (``config.routing_pool``): each sample, groups of samples, or the
whole micro-batch. With ``config.capacity_predictor`` (DiffMoE) each layer also holds ``capacity_predictor``,
an MLP trained alongside on the detached tokens to predict the pool routing's decisions; in eval mode it
replaces the pool routing: a token goes to every expert whose predicted probability exceeds the layer's
``capacity_threshold`` (:func:`set_capacity_threshold`), so the threshold trades compute for quality.
"""

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import DiTConfig
from .grouped_gemm import grouped_linear, swiglu
from .mlp import GeluMLP, SwiGLU
from .routing import Routing, capacity_predictor_loss, pool_expert_choice, threshold_choice, token_choice


class GroupedExperts(nn.Module):
    """E experts applied to tokens already sorted by expert (contiguous slices): SwiGLU (``gate_up_proj``,
    ``down_proj``) or, with ``activation="gelu"``, GELU FFNs (``up_proj``, ``down_proj``); no biases."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        if activation == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden_size))
        elif activation == "gelu":
            self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden_size))
        else:
            raise ValueError(f"expert_activation={activation!r} is not 'swiglu' or 'gelu'")
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden))
        self.reset_parameters()

    @property
    def in_proj(self) -> nn.Parameter:
        """The input projection: ``gate_up_proj`` (E, 2F, D) for SwiGLU, ``up_proj`` (E, F, D) for GELU."""
        return self.gate_up_proj if self.activation == "swiglu" else self.up_proj

    def reset_parameters(self):
        """Xavier-uniform per expert and per projection, like separate nn.Linear layers in DiT."""
        ffn, hidden = self.down_proj.shape[2], self.down_proj.shape[1]
        bound = math.sqrt(6.0 / (ffn + hidden))
        nn.init.uniform_(self.in_proj, -bound, bound)
        nn.init.uniform_(self.down_proj, -bound, bound)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (A, D) tokens sorted by expert, ``counts[e]`` of them for expert e ((E,) int64). Returns (A, D).

        One grouped GEMM per projection in every dtype: no per-expert launches, no host synchronisation.
        """
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end of each expert's rows
        if self.activation == "swiglu":
            hidden = swiglu(grouped_linear(x, self.gate_up_proj, offsets))  # (A, 2F) -> (A, F)
        else:
            hidden = F.gelu(grouped_linear(x, self.up_proj, offsets), approximate="tanh")  # (A, F)
        return grouped_linear(hidden, self.down_proj, offsets)  # (A, D)


def dispatch(x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    """Sort assignments by expert, run the experts on their contiguous slices, weight and scatter-add back:
    one gather in, one weighted scatter out.

    x: (T, D). Returns (T, D).
    """
    if routing.token_index.numel() == 0:  # only a capacity predictor's sampling routing: no expert took a token
        return torch.zeros_like(x)
    order = torch.argsort(routing.expert_index, stable=True)  # (A,)
    token = routing.token_index[order]
    out = experts(x.index_select(0, token), routing.tokens_per_expert)  # (A, D)
    out = out * routing.weight[order].to(out.dtype)[:, None]
    return torch.zeros_like(x).index_add_(0, token, out)


def build_shared_experts(config: DiTConfig) -> nn.Module | None:
    """The fused shared experts (width ``config.shared_hidden``) in the experts' activation, or None."""
    if not config.shared_hidden:
        return None
    if config.expert_activation == "gelu":
        return GeluMLP(config.hidden_size, config.shared_hidden, bias=False)
    return SwiGLU(config.hidden_size, config.shared_hidden)


def predict_capacity(predictor: nn.Module, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The capacity predictor's logits (N*T, E) for tokens x (N, T, D), from the detached tokens: it learns the
    routing alongside the model, never into it."""
    return predictor(x.detach()).reshape(-1, num_experts)


def build_capacity_predictor(config: DiTConfig) -> nn.Module | None:
    """DiffMoE's capacity predictor, Linear(D, D) -> SiLU -> Linear(D, E), or None without one."""
    if not config.capacity_predictor:
        return None
    d = config.hidden_size
    return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, config.num_experts))


class MoEFeedForward(nn.Module):
    """Routed experts plus shared experts; keeps the last forward's auxiliary loss and expert load.

    ``aux_loss``: the balance loss (token choice) plus, with a capacity predictor, its weighted binary
    cross-entropy (``predictor_loss``, also kept apart); both only in training mode, 0 in eval mode.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.routing = config.routing
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.routing_pool = config.routing_pool
        self.routing_group_size = config.routing_group_size
        self.alpha = config.balance_loss_alpha
        self.gate = nn.Linear(d, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, d, config.expert_hidden, config.expert_activation)
        self.shared_experts = build_shared_experts(config)
        self.capacity_predictor = build_capacity_predictor(config)
        #: Sampling-time threshold of the capacity predictor; None routes as in training (the pools).
        self.capacity_threshold: float | None = config.capacity_threshold if config.capacity_predictor else None
        self.predictor_weight = config.capacity_predictor_weight
        self.aux_loss: torch.Tensor | None = None
        self.predictor_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self._routing_hooks: OrderedDict[int, Callable] = OrderedDict()

    def register_routing_hook(self, hook: Callable[[nn.Module, Routing, tuple[int, int]], None]) -> RemovableHandle:
        """Call ``hook(module, routing, (n, t))`` after each forward's routing of n samples of t tokens
        (observers such as the routing analysis); ``handle.remove()`` detaches it."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def set_capacity_threshold(self, threshold: float | None) -> None:
        """Sampling-time threshold of the capacity predictor in [0, 1] (higher: fewer assignments), or None
        to route in eval mode as in training (the pools)."""
        if self.capacity_predictor is None:
            raise ValueError("this MoE layer has no capacity predictor (capacity_predictor=False)")
        self.capacity_threshold = _check_threshold(threshold)

    def uses_predictor_routing(self) -> bool:
        """Whether a forward now routes by the capacity predictor's threshold (eval mode, threshold set)."""
        return self.capacity_predictor is not None and not self.training and self.capacity_threshold is not None

    def route(self, x: torch.Tensor) -> Routing:
        """x: (N, T, D) -> assignments over the flattened (N*T) tokens."""
        logits = self.gate(x)  # (N, T, E)
        if self.routing == "expert_choice":
            if self.uses_predictor_routing():
                predicted = predict_capacity(self.capacity_predictor, x, self.num_experts)
                return threshold_choice(logits.reshape(-1, self.num_experts), predicted, self.capacity_threshold)
            return pool_expert_choice(logits, self.capacity_factor, self.routing_pool, self.routing_group_size)
        alpha = self.alpha if self.training else 0.0
        return token_choice(logits.reshape(-1, self.num_experts), self.top_k, self.norm_topk_prob, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        routing = self.route(x)
        self.aux_loss = routing.aux_loss
        self.predictor_loss = None
        if self.capacity_predictor is not None and self.training:
            predicted = predict_capacity(self.capacity_predictor, x, self.num_experts)
            self.predictor_loss = capacity_predictor_loss(predicted, routing)
            self.aux_loss = self.aux_loss + self.predictor_weight * self.predictor_loss
        self.expert_counts = routing.tokens_per_expert.detach()
        for hook in self._routing_hooks.values():
            hook(self, routing, (n, t))
        flat = x.reshape(n * t, d)
        y = dispatch(flat, routing, self.experts)  # (N*T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.reshape(n, t, d)


def _check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    threshold = float(threshold)
    if not (math.isfinite(threshold) and 0 <= threshold <= 1):
        raise ValueError(f"capacity_threshold={threshold} must be in [0, 1] (or None: route as in training)")
    return threshold


def set_capacity_threshold(model: nn.Module, threshold: float | None) -> int:
    """Set the sampling-time threshold of every capacity predictor in ``model`` (a DiT or one layer): in eval
    mode a token goes to every expert whose predicted probability exceeds it (higher: fewer assignments, less
    compute); None routes as in training. Returns the number of layers set; a ValueError without predictors."""
    threshold = _check_threshold(threshold)
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.capacity_predictor is not None]
    if not layers:
        raise ValueError("the model has no capacity predictor (capacity_predictor=False)")
    for layer in layers:
        layer.set_capacity_threshold(threshold)
    return len(layers)

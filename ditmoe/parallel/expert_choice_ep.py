"""Expert-choice routing under expert parallelism: DeepSpeed AutoEP's expert container, routed by expert choice.

AutoEP holds each rank's E/ep experts (``experts.w1/w3/w2``), registers them with DeepSpeed's expert-parallel
and expert-data-parallel groups and partitions them under ZeRO-3, but its router is token-choice top-k only.
:func:`use_expert_choice` turns every AutoEP layer into an :class:`ExpertChoiceEPLayer`: the same parameters,
groups, ZeRO handling and checkpoint layout, routed by expert choice over the model's routing pools.

Expert choice has a fixed capacity, so every rank sends every expert the same number of rows (C per pool, the
pools being the same on every rank): the all-to-all has equal, static splits. Nothing is read back to the host
and no counts are exchanged.

A DiffMoE capacity predictor (carried into the layer by ``expert_parallel.keep_capacity_predictors``) trains as in
``MoEFeedForward``: on the detached tokens, its loss weighted into ``aux_loss``. Its sampling-time routing (eval
mode with a threshold) routes a data-dependent number of tokens per expert, which these static exchanges cannot
carry: it is refused here; sample with the one-process model (``ditmoe.inference.load_model``).
"""

import torch
import torch.distributed as dist
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer, permute_by_local_expert, unpermute_by_local_expert

from ditmoe.model.config import DiTConfig
from ditmoe.model.moe import predict_capacity
from ditmoe.model.routing import Routing, capacity_predictor_loss, pool_expert_choice

from .distributed import check_collective_inputs


class _EqualAllToAll(torch.autograd.Function):
    """all_to_all_single with equal splits: row block i goes to rank i. It is its own inverse, so its
    backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        check_collective_inputs("expert-choice all_to_all", out, x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        check_collective_inputs("expert-choice all_to_all (backward)", out, grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class ExpertChoiceEPLayer(AutoEPMoELayer):
    """An AutoEP layer routed by expert choice (made by :func:`use_expert_choice`, not constructed)."""

    capacity_factor: float
    routing_pool: str
    routing_group_size: int
    capacity_predictor: torch.nn.Module | None
    capacity_threshold: float | None  # of the predictor in eval mode: refused here (see the module docstring)
    predictor_weight: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (N, T, D) -> (N, T, D). Sets ``aux_loss`` and ``expert_counts`` ((E,))."""
        n, t, d = hidden_states.shape
        x = hidden_states.reshape(n * t, d)
        # 1. every expert picks its top-C tokens of each routing pool: A = E·m assignments, m per expert
        self._check_routing_mode()
        logits = self.router.gate(hidden_states)  # (N, T, E)
        routing = pool_expert_choice(logits, self.capacity_factor, self.routing_pool, self.routing_group_size)
        self.aux_loss = self._predictor_aux_loss(hidden_states, routing)
        self.expert_counts = routing.tokens_per_expert.detach()
        # 2. expert-major order: EP rank r's experts are the contiguous rows [r·El·m, (r+1)·El·m)
        order = torch.argsort(routing.expert_index, stable=True)  # (A,)
        token = routing.token_index[order]
        per_expert = token.numel() // self.num_experts  # m, fixed by the shapes: the same on every rank
        # 3. exchange: this rank receives (ep sources, El local experts, m rows) of its own experts
        routed = _EqualAllToAll.apply(x.index_select(0, token), self.ep_group)  # (A, D)
        by_source = torch.full((self.ep_size, self.num_local_experts), per_expert, dtype=torch.int64,
                               device=x.device)
        rows, permutation, counts, num_rows = permute_by_local_expert(routed, by_source)
        out = unpermute_by_local_expert(self.experts(rows, counts), permutation, num_rows)  # (A, D)
        # 4. back to the tokens' ranks, weighted by the router's scores, summed per token
        out = _EqualAllToAll.apply(out, self.ep_group)  # (A, D) in the order of `token`
        out = out * routing.weight[order].to(out.dtype)[:, None]
        y = torch.zeros_like(x).index_add_(0, token, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(n, t, d)

    def _check_routing_mode(self) -> None:
        if self.capacity_predictor is not None and not self.training and self.capacity_threshold is not None:
            raise RuntimeError("the capacity predictor's threshold routing (eval mode) does not run under expert "
                               "parallelism: sample with the one-process model (ditmoe.inference.load_model)")

    def _predictor_aux_loss(self, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
        """0, plus in training the weighted loss of the capacity predictor's guess of ``routing`` (as
        ``MoEFeedForward``: on the detached tokens; also kept as ``predictor_loss``)."""
        self.predictor_loss = None
        aux = hidden_states.new_zeros((), dtype=torch.float32)
        if self.capacity_predictor is None or not self.training:
            return aux
        predicted = predict_capacity(self.capacity_predictor, hidden_states, self.num_experts)  # (N*T, E)
        self.predictor_loss = capacity_predictor_loss(predicted, routing)
        return aux + self.predictor_weight * self.predictor_loss


def use_expert_choice(module: torch.nn.Module, config: DiTConfig) -> int:
    """After ``deepspeed.initialize``: route every AutoEP layer of ``module`` by ``config``'s expert choice
    (capacity factor, routing pool) with its capacity predictor, if ``config`` has one. Parameters, groups and
    checkpoints stay AutoEP's. Returns the layers set."""
    layers = [m for m in module.modules() if isinstance(m, AutoEPMoELayer)]
    for layer in layers:
        predictor = getattr(layer, "capacity_predictor", None)
        if config.capacity_predictor and predictor is None:
            raise RuntimeError("an AutoEP layer lacks the model's capacity predictor: run deepspeed.initialize "
                               "inside expert_parallel.keep_capacity_predictors (ditmoe.parallel.engine.initialize)")
        layer.__class__ = ExpertChoiceEPLayer  # same object and state: only the forward changes
        layer.capacity_factor = config.capacity_factor
        layer.routing_pool = config.routing_pool
        layer.routing_group_size = config.routing_group_size
        if predictor is None:
            layer.capacity_predictor = None
        layer.capacity_threshold = config.capacity_threshold if predictor is not None else None
        layer.predictor_weight = config.capacity_predictor_weight
        layer.aux_loss, layer.expert_counts, layer.predictor_loss = None, None, None
    return len(layers)

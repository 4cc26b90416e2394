"""Each rank's experts under expert parallelism: DeepSpeed AutoEP's container, computed by ditmoe's grouped GEMM.

AutoEP holds a rank's E/ep experts as ``experts.w1``/``w3`` (E/ep, F', D) and ``experts.w2`` (E/ep, D, F) and
computes act(x·w1ᵀ, x·w3ᵀ)·w2ᵀ; it registers them with DeepSpeed's expert groups, partitions them under ZeRO-3
and checkpoints them under these names. Both of ditmoe's expert kinds take that form, the input projection
being [w1; w3] along the hidden units:

- SwiGLU: w1/w3 are the gate rows/up rows of ``gate_up_proj`` (F' = F; AutoEP splits them itself);
- GELU (EC-DiT): w1/w3 are the first/second half of the hidden units of ``up_proj`` (F' = F/2), and the
  activation is GELU(tanh) of both halves side by side (:data:`GELU_HALVES`, registered with AutoEP), so
  the layer computes GELU(x·up_projᵀ)·down_projᵀ with no extra weight. :class:`GeluExpertHalves` shows
  AutoEP the experts in this layout before ``deepspeed.initialize``.

After ``deepspeed.initialize``, :func:`use_ditmoe_experts` makes every AutoEP container compute with ditmoe's
grouped GEMM op (``grouped_linear``, the op of the one-process ``GroupedExperts``, whichever kernel it
selects) instead of AutoEP's own expert loop; the parameters stay AutoEP's.
"""

import torch
import torch.nn.functional as F
from deepspeed.moe.ep_experts import EXPERT_ACTIVATIONS, GroupedExperts, register_expert_activation
from torch import nn

from ..model.grouped_gemm import grouped_linear, swiglu
from ..model.moe import MoEFeedForward
from ..weights.autoep import GELU_HALVES


def _gelu_halves(first: torch.Tensor, second: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GELU(tanh) of the hidden units x·w1ᵀ and x·w3ᵀ, side by side (the input of w2)."""
    return F.gelu(torch.cat([first, second], dim=-1), approximate="tanh")


if GELU_HALVES not in EXPERT_ACTIVATIONS:
    register_expert_activation(GELU_HALVES, _gelu_halves)


class GeluExpertHalves(nn.Module):
    """ditmoe's GELU experts in AutoEP's layout, for AutoEP to take over in ``deepspeed.initialize`` (never run):
    ``w1``/``w3`` the first/second half of the rows of ``up_proj`` (E, F/2, D) each, ``w2`` = ``down_proj``."""

    def __init__(self, up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        first, second = up_proj.detach().chunk(2, dim=1)
        self.w1 = nn.Parameter(first.clone())
        self.w3 = nn.Parameter(second.clone())
        self.w2 = nn.Parameter(down_proj.detach().clone())


def present_gelu_experts(model: nn.Module) -> int:
    """Before the optimizer is built and ``deepspeed.initialize``: swap the GELU experts of every MoE layer of
    ``model`` for :class:`GeluExpertHalves` holding the same weights. Returns the layers changed."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.experts.activation == "gelu"]
    for layer in layers:
        layer.experts = GeluExpertHalves(layer.experts.up_proj, layer.experts.down_proj)
    return len(layers)


class DitmoeGroupedExperts(GroupedExperts):
    """AutoEP's expert container computed by ditmoe's grouped GEMM (made by :func:`use_ditmoe_experts`)."""

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: (A, D) rows sorted by local expert, ``num_tokens_per_expert[e]`` of them for expert e. Returns (A, D).

        AutoEP may end x with alignment rows of zeros after the last group: they join the last expert (bias-free
        experts map them to zeros, which AutoEP drops), so the groups cover every row as the op expects.
        """
        offsets = torch.cumsum(num_tokens_per_expert, 0, dtype=torch.int32)
        offsets[-1] = x.shape[0]
        # [w1; w3] projection as two GEMMs: the weights stay the parameters (ZeRO-3 releases and re-gathers them)
        hidden = torch.cat([grouped_linear(x, self.w1, offsets), grouped_linear(x, self.w3, offsets)], dim=-1)
        if self.activation == "swiglu":
            hidden = swiglu(hidden)  # (A, 2F) -> (A, F)
        else:
            hidden = F.gelu(hidden, approximate="tanh")  # (A, F)
        return grouped_linear(hidden, self.w2, offsets)


def use_ditmoe_experts(module: nn.Module) -> int:
    """After ``deepspeed.initialize``: every AutoEP expert container in ``module`` computes with ditmoe's grouped
    GEMM (same object, parameters, hooks and groups: only the forward changes). Returns the containers set."""
    containers = [m for m in module.modules() if isinstance(m, GroupedExperts)]
    for experts in containers:
        if experts.activation not in ("swiglu", GELU_HALVES):
            raise ValueError(f"AutoEP experts with activation {experts.activation!r} are not ditmoe's")
        experts.__class__ = DitmoeGroupedExperts
    return len(containers)

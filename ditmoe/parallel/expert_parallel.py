"""Expert parallelism through DeepSpeed AutoEP: config, checks, DiT-MoE balance loss, names back to ours.

AutoEP replaces each ``blocks.{i}.mlp`` MoE module with ``AutoEPMoELayer``: router ``router.gate``
(our ``gate``), local experts ``experts.w1/w3/w2`` (gate rows / up rows of our ``gate_up_proj``, and
``down_proj``) holding experts ``[ep_rank·E/ep, (ep_rank+1)·E/ep)``, our ``shared_experts`` reused.
"""

import re

import torch
import torch.distributed as dist

from ditmoe.model.config import DiTConfig
from ditmoe.model.routing import balance_loss, count_per_expert
from ditmoe.weights import autoep

MOE_LAYER_PATTERN = r"blocks\.\d+\.mlp"


def autoep_config(ep_size: int, model_config: DiTConfig, *, grouped_mm: bool | None = None) -> dict:
    """The ``expert_parallel`` section of a DeepSpeed config (disabled for ``ep_size == 1``).

    A custom preset (no ``preset_model``, no ``model_type``): no Transformers version check applies.
    ``grouped_mm`` (default: CUDA available) selects ``torch._grouped_mm`` over the per-expert loop.
    """
    if ep_size == 1:
        return {"enabled": False}
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": MOE_LAYER_PATTERN,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_up_proj",
        "expert_w2": "down_proj",
        "expert_w3": None,  # gate and up fused, gate rows first
        "num_experts_attr": "num_experts",
        "top_k_attr": "top_k",
        "score_func": "softmax",
        "score_apply": "post",
        "route_norm": bool(model_config.norm_topk_prob),
        "has_shared_experts": model_config.shared_hidden > 0,
        "shared_experts_pattern": "shared_experts",
        "expert_activation": "swiglu",
        "use_grouped_mm": torch.cuda.is_available() if grouped_mm is None else grouped_mm,
    }


def validate_ep(ep_size: int, num_experts: int, world_size: int, zero_stage: int,
                zero_config: dict | None = None) -> None:
    """Raise a ValueError for an expert-parallel layout DeepSpeed AutoEP (or ditmoe) cannot run.

    ``zero_config`` (the ``zero_optimization`` section) is checked for what AutoEP refuses at stage 3.
    """
    if ep_size < 1:
        raise ValueError(f"ep_size={ep_size} must be >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage} must be 0, 1, 2 or 3")
    if ep_size == 1:
        return
    if num_experts == 0:
        raise ValueError(f"ep_size={ep_size} needs a mixture-of-experts model, but num_experts=0 (dense)")
    if num_experts % ep_size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"ep_size={ep_size} does not divide num_experts={num_experts}; choose one of {divisors}")
    if world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the world size {world_size}")
    zero_config = zero_config or {}
    if zero_stage == 3 and zero_config.get("zero_quantized_gradients"):
        raise ValueError("DeepSpeed AutoEP with ZeRO-3 does not support zero_quantized_gradients")
    if zero_stage == 3 and zero_config.get("zero_hpz_partition_size", 1) > 1:
        raise ValueError("DeepSpeed AutoEP with ZeRO-3 does not support hpZ (zero_hpz_partition_size > 1)")


def check_ep_model(ep_size: int, model_config: DiTConfig) -> None:
    """Raise a ValueError for a model expert parallelism cannot hold: AutoEP's experts are SwiGLU (gated) only,
    and its layer replaces the whole MoE module, which would drop a capacity predictor."""
    if ep_size == 1:
        return
    if model_config.expert_activation != "swiglu":
        raise ValueError(f"expert parallelism (ep_size={ep_size}) runs through DeepSpeed AutoEP, whose experts are "
                         f"SwiGLU only: expert_activation={model_config.expert_activation!r} needs ep_size=1")
    if model_config.capacity_predictor:
        raise ValueError(f"expert parallelism (ep_size={ep_size}) does not hold a capacity predictor (AutoEP replaces "
                         "the whole MoE module): capacity_predictor=true needs ep_size=1")


def moe_param_groups(model: torch.nn.Module, ep_size: int, zero_stage: int) -> list[dict]:
    """Optimizer param groups for a client optimizer built before ``deepspeed.initialize``.

    With EP, ZeRO-1/2 need the expert weights in a group marked ``moe`` and named after their EP
    group; AutoEP puts each replacement expert weight into the group of the weight it came from.
    Under ZeRO-1/2 the experts get their own group even without EP: DeepSpeed's universal
    checkpoint restores ZeRO-1/2 optimizer state group by group, so runs with and without EP must
    have the same groups. (ZeRO-3 restores by parameter name; one group without EP.)
    """
    experts = [p for name, m in model.named_modules() if re.fullmatch(MOE_LAYER_PATTERN, name)
               and hasattr(m, "experts") for p in m.experts.parameters()]
    if not experts or (ep_size == 1 and zero_stage == 3):
        return [{"params": list(model.parameters()), "name": "params"}]
    ids = {id(p) for p in experts}
    expert_group = {"params": experts, "name": "experts"}
    if ep_size > 1:
        expert_group.update(name=f"ep_size_{ep_size}", moe=True)
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "name": "params"}, expert_group]


def _autoep_layers(module: torch.nn.Module):
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, AutoEPMoELayer)]


def attach_balance_loss(model: torch.nn.Module, alpha: float | None = None) -> int:
    """After ``deepspeed.initialize``: give every AutoEP layer DiT-MoE's balance loss and expert counts.

    Each forward sets ``layer.aux_loss`` (α·Σ f_i·P_i over this rank's micro-batch tokens, with grad
    into ``router.gate.weight``; 0 in eval mode, like ``MoEFeedForward``) and ``layer.expert_counts``
    ((E,) int64, the assignments AutoEP dispatched). Returns the number of layers hooked.
    """
    alpha = model.config.balance_loss_alpha if alpha is None else alpha
    layers = _autoep_layers(model)
    for _, layer in layers:
        _hook(layer, alpha)
    return len(layers)


def _hook(layer, alpha: float) -> None:
    layer.aux_loss, layer.expert_counts = None, None
    logits = {}

    def on_gate(_, __, out):
        logits["last"] = out  # (T, E)

    def on_router(_, __, out):
        _, selected, _ = out  # (T, k) chosen experts
        probs = logits.pop("last").float().softmax(dim=-1)
        counts = count_per_expert(selected, layer.num_experts)
        layer.expert_counts = counts
        if layer.training and alpha > 0:
            layer.aux_loss = balance_loss(probs, counts, layer.top_k, alpha)
        else:
            layer.aux_loss = probs.new_zeros(())

    layer.router.gate.register_forward_hook(on_gate)
    layer.router.register_forward_hook(on_router)


def _full(param: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
    """A detached full copy of a parameter, or of ``local``, a tensor laid out like this rank's
    part of it (e.g. its EMA): gathered from the ZeRO-3 partitions where partitioned."""
    if not hasattr(param, "ds_id"):
        return (param if local is None else local).detach().clone()
    if local is None:
        local = param.ds_tensor
    group = param.ds_process_group
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).clone()


def _all_experts(local: torch.Tensor, layer) -> torch.Tensor:
    """Concatenate the per-rank expert shards (E/ep, ...) over the EP group into (E, ...)."""
    if layer.ep_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=layer.ep_group)
    return torch.cat(parts)


def gather_full_state_dict(engine, local: dict[str, torch.Tensor] | None = None) -> dict:
    """The model's full state dict in ditmoe's own names and shapes, on rank 0 ({} on other ranks).

    With ``local`` (parameter name -> tensor laid out like this rank's part of that parameter, e.g.
    an EMA), those tensors are gathered instead of the weights. Works for ZeRO-0/1/2/3 with or
    without AutoEP; a collective: every rank must call it.
    """
    module = engine.module
    params = dict(module.named_parameters())
    layers = dict(_autoep_layers(module))
    keep = dist.get_rank() == 0  # gathered one parameter at a time; other ranks drop each at once
    out = {}
    for name, value in module.state_dict().items():
        if name not in params:
            full = value.detach().clone()  # buffers
        else:
            full = _full(params[name], None if local is None else local[name])
            layer = layers.get(autoep.expert_layer(name))
            if layer is not None:  # this rank's experts -> all experts
                full = _all_experts(full, layer)
        if keep:
            out[name] = full.cpu()  # host memory: the device never holds more than one parameter
    return autoep.to_ditmoe(out) if keep else {}


def local_state_from_full(module: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``gather_full_state_dict`` on this rank: for every parameter of ``module`` (as
    DeepSpeed holds it), the part this rank holds, cut from ``full`` (ditmoe's names and shapes):
    its experts under AutoEP, its flat padded partition under ZeRO-3. No communication."""
    layers = dict(_autoep_layers(module))
    return {name: _partition(p, _ditmoe_tensor(name, full, layers)) for name, p in module.named_parameters()}


def _ditmoe_tensor(name: str, full: dict, layers: dict) -> torch.Tensor:
    """The full tensor of parameter ``name`` (an AutoEP expert weight: this rank's experts only)."""
    value = autoep.ditmoe_tensor(name, full)
    layer = layers.get(autoep.expert_layer(name))
    if layer is None:
        return value
    return value[layer.ep_rank * layer.num_local_experts:(layer.ep_rank + 1) * layer.num_local_experts]


def _partition(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``value`` (laid out like ``param.ds_tensor``), or ``value``."""
    if not hasattr(param, "ds_id"):
        return value.clone()
    size = param.ds_tensor.numel()
    flat = value.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(size * dist.get_world_size(param.ds_process_group) - flat.numel())])
    start = size * dist.get_rank(param.ds_process_group)
    return flat[start:start + size].clone()

"""Expert parallelism through DeepSpeed AutoEP: config, checks, DiT-MoE balance loss, names back to ours.

AutoEP replaces each ``blocks.{i}.mlp`` MoE module with ``AutoEPMoELayer``: router ``router.gate``
(our ``gate``), local experts ``experts.w1/w3/w2`` holding experts ``[ep_rank·E/ep, (ep_rank+1)·E/ep)``
(the two halves of the rows of our ``gate_up_proj``/``up_proj``, and ``down_proj``: see ``ep_experts``),
our ``shared_experts`` reused, and our ``capacity_predictor`` carried over (:func:`keep_capacity_predictors`).

Around ``deepspeed.initialize``: :func:`prepare_for_autoep` before the optimizer is built,
:func:`keep_capacity_predictors` during it (``ditmoe.parallel.engine.initialize``), :func:`adapt_autoep_layers`
after it.
"""

import contextlib
import re

import torch
import torch.distributed as dist

from ditmoe.model.config import DiTConfig
from ditmoe.model.routing import balance_loss, count_per_expert
from ditmoe.weights import autoep

from .distributed import check_collective_inputs

MOE_LAYER_PATTERN = r"blocks\.\d+\.mlp"


def autoep_config(ep_size: int, model_config: DiTConfig) -> dict:
    """The ``expert_parallel`` section of a DeepSpeed config (disabled for ``ep_size == 1``).

    A custom preset (no ``preset_model``, no ``model_type``): no Transformers version check applies.
    SwiGLU experts are read from our ``gate_up_proj`` (gate rows first); GELU experts from the halves
    :func:`prepare_for_autoep` lays out. AutoEP's own expert loop is never run: :func:`adapt_autoep_layers`
    computes the experts with ditmoe's grouped GEMM.
    """
    if ep_size == 1:
        return {"enabled": False}
    if model_config.expert_activation == "gelu":
        experts = {"expert_w1": "w1", "expert_w2": "w2", "expert_w3": "w3", "expert_activation": autoep.GELU_HALVES}
    else:  # gate and up fused, gate rows first
        experts = {"expert_w1": "gate_up_proj", "expert_w2": "down_proj", "expert_w3": None,
                   "expert_activation": "swiglu"}
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": MOE_LAYER_PATTERN,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        **experts,
        "num_experts_attr": "num_experts",
        "top_k_attr": "top_k",
        "score_func": "softmax",
        "score_apply": "post",
        "route_norm": bool(model_config.norm_topk_prob),
        "has_shared_experts": model_config.shared_hidden > 0,
        "shared_experts_pattern": "shared_experts",
        "use_grouped_mm": False,  # AutoEP's loop only runs if adapt_autoep_layers is skipped
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
    """Raise a ValueError for a model expert parallelism cannot hold: GELU experts go to AutoEP as the two
    halves of their hidden units, each computed by a grouped GEMM whose output rows must span a multiple of
    16 bytes (8 units in bf16), so their width must be a multiple of 16."""
    if ep_size == 1:
        return
    if model_config.expert_activation == "gelu" and model_config.expert_hidden % 16:
        raise ValueError(f"expert parallelism (ep_size={ep_size}) splits each GELU expert's hidden units into two "
                         f"halves of whole 16-byte rows: expert width {model_config.expert_hidden} (expert_ratio x "
                         "hidden_size) must be a multiple of 16, or use ep_size=1")


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


def prepare_for_autoep(model: torch.nn.Module, ep_size: int) -> int:
    """Before the optimizer is built and ``deepspeed.initialize``: lay out GELU experts the way AutoEP reads
    them (``ep_experts.GeluExpertHalves``, same weights) and register their activation with AutoEP.
    Returns the layers changed (0 without EP or with SwiGLU experts)."""
    if ep_size == 1:
        return 0
    from .ep_experts import present_gelu_experts

    return present_gelu_experts(model)


@contextlib.contextmanager
def keep_capacity_predictors():
    """Around ``deepspeed.initialize``: when AutoEP puts its layer in place of one of our MoE layers, the new
    layer adopts the old one's ``capacity_predictor`` under the same name. This happens before DeepSpeed names
    the parameters, partitions them (ZeRO-3) and re-points the optimizer, so the predictor trains, is
    checkpointed and converted like any replicated weight."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    def adopt(parent: torch.nn.Module, name: str, child):
        predictor = getattr(parent._modules.get(name), "capacity_predictor", None)
        if isinstance(child, AutoEPMoELayer) and predictor is not None:
            child.capacity_predictor = predictor

    handle = torch.nn.modules.module.register_module_module_registration_hook(adopt)
    try:
        yield
    finally:
        handle.remove()


def adapt_autoep_layers(module: torch.nn.Module, config: DiTConfig) -> int:
    """After ``deepspeed.initialize``: the AutoEP layers of ``module`` compute their experts with ditmoe's grouped
    GEMM and route as ``config`` says (expert choice with its capacity predictor, or token choice with DiT-MoE's
    balance loss). Returns the number of AutoEP layers."""
    if not _autoep_layers(module):
        return 0
    from .ep_experts import use_ditmoe_experts

    use_ditmoe_experts(module)
    if config.routing == "expert_choice":
        from .expert_choice_ep import use_expert_choice

        return use_expert_choice(module, config)
    return attach_balance_loss(module, config.balance_loss_alpha)


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
    local = local.detach().contiguous()
    check_collective_inputs("all_gather of a ZeRO-3 partition", local, *parts)
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).clone()


def _all_experts(local: torch.Tensor, layer) -> torch.Tensor:
    """Concatenate the per-rank expert shards (E/ep, ...) over the EP group into (E, ...)."""
    if layer.ep_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    local = local.contiguous()
    check_collective_inputs("all_gather of the experts", local, *parts)
    dist.all_gather(parts, local, group=layer.ep_group)
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

"""DeepSpeed AutoEP's parameter names <-> ditmoe's, for the MoE layers (pure tensor renames).

AutoEP replaces MoE layer ``<layer>`` (e.g. ``blocks.0.mlp``) with its own module: the router weight
``<layer>.router.gate.weight`` is ours ``<layer>.gate.weight``; the experts ``<layer>.experts.w1 / w3``
(E, F, D) are the gate rows / up rows of our fused ``<layer>.experts.gate_up_proj`` (E, 2F, D), gate
rows first, and ``<layer>.experts.w2`` (E, D, F) is our ``<layer>.experts.down_proj``. Every other
name (attention, shared experts, ...) is the same in both.
"""

import torch

EXPERT_LEAVES = ("w1", "w3", "w2")  # AutoEP: gate, up, down


def router_name(layer: str) -> str:
    return f"{layer}.router.gate.weight"


def gate_name(layer: str) -> str:
    return f"{layer}.gate.weight"


def autoep_expert_names(layer: str) -> tuple[str, str, str]:
    """(w1, w3, w2): gate, up and down weights of the experts of ``layer`` in AutoEP's names."""
    return tuple(f"{layer}.experts.{leaf}" for leaf in EXPERT_LEAVES)


def ditmoe_expert_names(layer: str) -> tuple[str, str]:
    """(gate_up_proj, down_proj) of the experts of ``layer`` in ditmoe's names."""
    return f"{layer}.experts.gate_up_proj", f"{layer}.experts.down_proj"


def expert_layer(name: str) -> str | None:
    """The layer of an AutoEP expert weight (``blocks.0.mlp.experts.w3`` -> ``blocks.0.mlp``), else None."""
    layer, _, leaf = name.rpartition(".experts.")
    return layer if layer and leaf in EXPERT_LEAVES else None


def is_autoep_name(name: str) -> bool:
    """A name only AutoEP uses (router or expert weight)."""
    return ".router.gate." in name or expert_layer(name) is not None


def autoep_layers(names) -> list[str]:
    """The MoE layers written in AutoEP's names, in the order of ``names``."""
    return [name.removesuffix(".experts.w1") for name in names if name.endswith(".experts.w1")]


def ditmoe_layers(names) -> list[str]:
    """The MoE layers written in ditmoe's names, in the order of ``names``."""
    return [name.removesuffix(".experts.gate_up_proj") for name in names if name.endswith(".experts.gate_up_proj")]


def experts_to_ditmoe(layer: str, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoEP's (w1, w3, w2) of ``layer`` -> {gate_up_proj name: (E, 2F, D), down_proj name: (E, D, F)}."""
    gate_up, down = ditmoe_expert_names(layer)
    return {gate_up: torch.cat([w1, w3], dim=1), down: w2}


def experts_from_ditmoe(layer: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """ditmoe's (gate_up_proj, down_proj) of ``layer`` -> {w1 name, w3 name, w2 name: tensor} (views)."""
    gate, up = gate_up.chunk(2, dim=1)  # (E, F, D) each, gate rows first
    return dict(zip(autoep_expert_names(layer), (gate, up, down)))


def to_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict in AutoEP's names -> ditmoe's; each MoE layer's renamed weights move to the end."""
    return _rename_layers(state, autoep_layers(state), router_name, gate_name, autoep_expert_names, experts_to_ditmoe)


def from_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict in ditmoe's names -> AutoEP's; each MoE layer's renamed weights move to the end."""
    return _rename_layers(state, ditmoe_layers(state), gate_name, router_name, ditmoe_expert_names,
                          experts_from_ditmoe)


def _rename_layers(state: dict, layers, router_from, router_to, expert_names, convert_experts) -> dict:
    """``state`` with, for every MoE ``layer``, its router renamed and its expert weights converted."""
    out = dict(state)
    for layer in layers:
        out[router_to(layer)] = out.pop(router_from(layer))
        out.update(convert_experts(layer, *(out.pop(name) for name in expert_names(layer))))
    return out


def ditmoe_tensor(name: str, full: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full tensor (all experts) of parameter ``name``, AutoEP's or ditmoe's, from ``full`` in ditmoe's names."""
    layer = expert_layer(name)
    if layer is not None:
        return experts_from_ditmoe(layer, *(full[n] for n in ditmoe_expert_names(layer)))[name]
    if name.endswith(".router.gate.weight"):
        return full[gate_name(name.removesuffix(".router.gate.weight"))]
    return full[name]

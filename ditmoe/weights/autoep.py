"""DeepSpeed AutoEP's parameter names <-> ditmoe's, for the MoE layers (pure tensor renames).

AutoEP replaces MoE layer ``<layer>`` (e.g. ``blocks.0.mlp``) with its own module: the router weight
``<layer>.router.gate.weight`` is ours ``<layer>.gate.weight``; the experts ``<layer>.experts.w1 / w3``
(E, F', D) are the first / second half of the rows of our experts' input projection, and ``<layer>.experts.w2``
(E, D, F) is our ``<layer>.experts.down_proj``. The input projection is SwiGLU's fused ``gate_up_proj``
(E, 2F, D: gate rows, then up rows; F' = F) or GELU's ``up_proj`` (E, F, D: its hidden units split in two,
F' = F/2; see ``ditmoe.parallel.ep_experts``); which one a layer has follows from the shapes. Every other name
(attention, shared experts, capacity predictor, ...) is the same in both.
"""

import torch

EXPERT_LEAVES = ("w1", "w3", "w2")  # AutoEP: first half, second half of the input projection; down
IN_PROJ_LEAVES = ("gate_up_proj", "up_proj")  # ditmoe's input projection: SwiGLU, GELU
GELU_HALVES = "gelu_tanh_halves"  # AutoEP activation of GELU experts as two halves (ditmoe.parallel.ep_experts)


def router_name(layer: str) -> str:
    return f"{layer}.router.gate.weight"


def gate_name(layer: str) -> str:
    return f"{layer}.gate.weight"


def autoep_expert_names(layer: str) -> tuple[str, str, str]:
    """(w1, w3, w2): the weights of the experts of ``layer`` in AutoEP's names."""
    return tuple(f"{layer}.experts.{leaf}" for leaf in EXPERT_LEAVES)


def ditmoe_expert_names(layer: str, in_proj: str = "gate_up_proj") -> tuple[str, str]:
    """(input projection, down_proj) of the experts of ``layer`` in ditmoe's names; ``in_proj``: its leaf."""
    return f"{layer}.experts.{in_proj}", f"{layer}.experts.down_proj"


def ditmoe_in_proj(layer: str, names) -> str:
    """The leaf of ``layer``'s expert input projection among ``names`` (ditmoe's): gate_up_proj or up_proj."""
    for leaf in IN_PROJ_LEAVES:
        if f"{layer}.experts.{leaf}" in names:
            return leaf
    raise KeyError(f"no expert weights of {layer} ({' or '.join(IN_PROJ_LEAVES)})")


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
    return [layer for name in names for leaf in IN_PROJ_LEAVES
            if (layer := name.removesuffix(f".experts.{leaf}")) != name]


def in_proj_leaf(w1: torch.Tensor, w2: torch.Tensor) -> str:
    """ditmoe's leaf for [w1; w3]: SwiGLU's gate_up_proj when w2 (E, D, F) is as wide as w1 (E, F, D) has rows,
    GELU's up_proj when it is twice as wide (w1 and w3 each half of the hidden units)."""
    rows, width = w1.shape[1], w2.shape[-1]
    if width not in (rows, 2 * rows):
        raise ValueError(f"AutoEP expert weights w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} are neither SwiGLU "
                         "(w2 as wide as w1 has rows) nor GELU halves (twice as wide)")
    return "up_proj" if width == 2 * rows else "gate_up_proj"


def experts_to_ditmoe(layer: str, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoEP's (w1, w3, w2) of ``layer`` -> {gate_up_proj (E, 2F, D) or up_proj (E, F, D) name, down_proj name}."""
    in_proj, down = ditmoe_expert_names(layer, in_proj_leaf(w1, w2))
    return {in_proj: torch.cat([w1, w3], dim=1), down: w2}


def experts_from_ditmoe(layer: str, in_proj: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """ditmoe's (gate_up_proj or up_proj, down_proj) of ``layer`` -> {w1 name, w3 name, w2 name: tensor} (views)."""
    first, second = in_proj.chunk(2, dim=1)  # (E, F', D) each: gate and up rows, or the halves of GELU's units
    return dict(zip(autoep_expert_names(layer), (first, second, down)))


def to_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict in AutoEP's names -> ditmoe's; each MoE layer's renamed weights move to the end."""
    out = dict(state)
    for layer in autoep_layers(state):
        out[gate_name(layer)] = out.pop(router_name(layer))
        out.update(experts_to_ditmoe(layer, *(out.pop(name) for name in autoep_expert_names(layer))))
    return out


def from_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict in ditmoe's names -> AutoEP's; each MoE layer's renamed weights move to the end."""
    out = dict(state)
    for layer in ditmoe_layers(state):
        out[router_name(layer)] = out.pop(gate_name(layer))
        names = ditmoe_expert_names(layer, ditmoe_in_proj(layer, state))
        out.update(experts_from_ditmoe(layer, *(out.pop(name) for name in names)))
    return out


def ditmoe_tensor(name: str, full: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full tensor (all experts) of parameter ``name``, AutoEP's or ditmoe's, from ``full`` in ditmoe's names."""
    layer = expert_layer(name)
    if layer is not None:
        names = ditmoe_expert_names(layer, ditmoe_in_proj(layer, full))
        return experts_from_ditmoe(layer, *(full[n] for n in names))[name]
    if name.endswith(".router.gate.weight"):
        return full[gate_name(name.removesuffix(".router.gate.weight"))]
    return full[name]

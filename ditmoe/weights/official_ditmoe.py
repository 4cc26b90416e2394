"""feizc/DiT-MoE's published layout: DiT's (see ``dit``) with each block's feed-forward under ``moe.``:
the router ``moe.gate.weight`` (E, D), routed experts ``moe.experts.{j}.{gate,up,down}_proj.weight`` (one
SwiGLU each, no bias) and the fused shared experts ``moe.shared_experts.*``. ditmoe stacks the routed
experts: ``mlp.experts.gate_up_proj`` (E, 2F, D) is [gate; up], ``mlp.experts.down_proj`` is (E, D, F)."""

import re

import torch

from . import dit

MOE_KEY = re.compile(r"(blocks\.\d+)\.moe\.(.+)")
DITMOE_MOE_KEY = re.compile(r"(blocks\.\d+)\.mlp\.((gate|shared_experts)\..+)")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def to_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ditmoe's names in float32; every key is used (KeyError naming a missing or an unexpected key)."""
    moe = {key: value for key, value in state.items() if MOE_KEY.match(key)}
    out = _moe_to_ditmoe(moe)
    out.update(dit.to_ditmoe({key: value for key, value in state.items() if key not in moe}))
    return out


def from_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published layout (timm attention names): one SwiGLU per routed expert, ``pos_embed`` included."""
    out, dense = {}, {}
    for key, value in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix, width = key.removesuffix(".mlp.experts.gate_up_proj"), value.shape[1] // 2
            for j, expert in enumerate(value):  # cloned: each tensor owns its storage, as in the published files
                out[f"{prefix}.moe.experts.{j}.gate_proj.weight"] = expert[:width].clone()
                out[f"{prefix}.moe.experts.{j}.up_proj.weight"] = expert[width:].clone()
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key.removesuffix(".mlp.experts.down_proj")
            for j, expert in enumerate(value):
                out[f"{prefix}.moe.experts.{j}.down_proj.weight"] = expert.clone()
        elif match := DITMOE_MOE_KEY.fullmatch(key):
            out[f"{match[1]}.moe.{match[2]}"] = value
        else:
            dense[key] = value
    out.update(dit.from_ditmoe(dense))
    return out


def _moe_to_ditmoe(moe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``moe.*`` tensors of every block under ditmoe's names, routed experts stacked."""
    used, out = set(), {}

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return _require(moe, key).float()

    for key in moe:
        prefix, rest = MOE_KEY.match(key).groups()
        if rest == "gate.weight" or rest.startswith("shared_experts."):
            out[f"{prefix}.mlp.{rest}"] = take(key)
    for prefix in dict.fromkeys(MOE_KEY.match(key)[1] for key in moe):
        experts = range(take(f"{prefix}.moe.gate.weight").shape[0])
        proj = {w: torch.stack([take(f"{prefix}.moe.experts.{j}.{w}.weight") for j in experts]) for w in PROJECTIONS}
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([proj["gate_proj"], proj["up_proj"]], dim=1)
        out[f"{prefix}.mlp.experts.down_proj"] = proj["down_proj"]
    unused = sorted(set(moe) - used)
    if unused:
        raise KeyError(f"unexpected keys for this architecture: {unused[:8]}")
    return out


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"missing key {key!r}")
    return state[key]

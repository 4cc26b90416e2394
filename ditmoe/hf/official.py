"""Import published checkpoints: the official DiT-MoE ``.pt`` files (feizc/DiT-MoE) and
facebookresearch DiT ``.pt`` files, into ditmoe's model (config inferred from the tensor shapes).
Their key layouts and the renaming live in ``ditmoe.weights.official_ditmoe`` and ``ditmoe.weights.dit``.
"""

import re
from pathlib import Path

import torch

from ..model import DiT, DiTConfig
from ..weights import dit, official_ditmoe
from ..weights.safe_load import safe_load

# --from name -> the adapter of its key layout
ADAPTERS = {"official-ditmoe": official_ditmoe, "dit": dit}
SOURCES = tuple(ADAPTERS)
# Heads of the published sizes (hidden width -> heads); the shapes do not tell them without q/k norms.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 1408: 16}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A published ``.pt``: a bare state dict, or one under "ema"/"model"/"state_dict" (EMA preferred)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    return dit.unwrap_state_dict(safe_load(path), path)


def infer_config(state: dict[str, torch.Tensor], source: str, *, num_heads: int | None = None,
                 top_k: int = 2) -> DiTConfig:
    """The DiTConfig that holds ``state``; every shape is checked when the weights are loaded."""
    if source not in SOURCES:
        raise ValueError(f"--from {source!r}: choose one of {SOURCES}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    tokens = _require(state, "pos_embed").shape[1]
    out_channels = _require(state, "final_layer.linear.weight").shape[0] // patch**2
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    if num_heads is None:
        num_heads = hidden // state["blocks.0.attn.q_norm.weight"].shape[0] if qk_norm else HEADS_BY_WIDTH.get(hidden)
    if num_heads is None:
        raise ValueError(f"hidden width {hidden} is not a published size: pass --num-heads")
    fields = dict(input_size=int(tokens**0.5) * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                  depth=depth, num_heads=num_heads, qk_norm=qk_norm, learn_sigma=out_channels == 2 * in_channels,
                  num_classes=_require(state, "y_embedder.embedding_table.weight").shape[0] - 1)
    if source == "dit":
        fields["mlp_ratio"] = _require(state, "blocks.0.mlp.fc1.weight").shape[0] / hidden
        return DiTConfig(**fields)
    num_experts = _require(state, "blocks.0.moe.gate.weight").shape[0]
    shared = state.get("blocks.0.moe.shared_experts.gate_proj.weight")
    return DiTConfig(**fields, num_experts=num_experts, top_k=top_k,
                     expert_ratio=_require(state, "blocks.0.moe.experts.0.gate_proj.weight").shape[0] / hidden,
                     num_shared_experts=0 if shared is None else 2,  # one fused SwiGLU of 2 experts' width
                     shared_expert_ratio=0.0 if shared is None else shared.shape[0] / (2 * hidden))


def load_published(path: str | Path, source: str, *, num_heads: int | None = None, top_k: int = 2) -> DiT:
    """A ditmoe DiT holding a published checkpoint's weights (eval mode)."""
    state = read_state_dict(path)
    config = infer_config(state, source, num_heads=num_heads, top_k=top_k)
    model = DiT(config)
    converted = ADAPTERS[source].to_ditmoe(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k != "pos_embed"]
    if missing or unexpected:
        raise KeyError(f"checkpoint {path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model.eval()


def default_objective(config: DiTConfig) -> str:
    """The objective a published model was trained with: rectified flow for the official q/k-norm XL/G
    layout, DDPM otherwise."""
    return "rectified_flow" if config.qk_norm else "ddpm"


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"missing key {key!r}")
    return state[key]

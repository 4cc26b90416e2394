"""Import published checkpoints: the official DiT-MoE ``.pt`` files (feizc/DiT-MoE) and
facebookresearch DiT ``.pt`` files, into ditmoe's model (config inferred from the tensor shapes).

Official DiT-MoE layout, per block ``i``: ``blocks.i.moe.gate.weight`` (E, D), routed experts
``blocks.i.moe.experts.j.{gate,up,down}_proj.weight`` (one SwiGLU each, no bias) and
``blocks.i.moe.shared_experts.*``; attention ``attn.qkv``/``attn.proj`` (timm), or in the
flash-attention layout of the XL/G checkpoints ``attn.Wqkv``, per-head ``attn.q_norm``/``attn.k_norm``
LayerNorms and ``attn.out_proj``. DiT's blocks have a dense ``mlp.fc1``/``mlp.fc2`` instead.
"""

import re
from pathlib import Path

import torch

from ..model import DiT, DiTConfig
from ..model.embeddings import sincos_2d

SOURCES = ("official-ditmoe", "dit")
# Heads of the published sizes (hidden width -> heads); the shapes do not tell them without q/k norms.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 1408: 16}
ATTENTION_RENAMES = {"Wqkv": "qkv", "out_proj": "proj"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A published ``.pt``: a bare state dict, or one under "ema"/"model"/"state_dict" (EMA preferred)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path}: not a readable PyTorch file ({err})") from err
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise KeyError(f"checkpoint {path}: no DiT state dict in it (missing 'x_embedder.proj.weight')")
    return {k.removeprefix("module."): v for k, v in state.items()}


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


def convert_state_dict(state: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename and fuse the published tensors into ditmoe's names; every input key must be used."""
    used, out = set(), {}

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return _require(state, key).float()

    for key in state:
        block = re.match(r"(blocks\.\d+)\.(attn|moe|mlp)\.(.+)", key)
        if block is None:
            if key != "pos_embed":
                out[key] = take(key)
            continue
        prefix, part, rest = block.groups()
        if part == "attn":
            layer, _, leaf = rest.partition(".")
            out[f"{prefix}.attn.{ATTENTION_RENAMES.get(layer, layer)}.{leaf}"] = take(key)
        elif part == "mlp":
            out[f"{prefix}.mlp.{rest}"] = take(key)
        elif rest == "gate.weight" or rest.startswith("shared_experts."):
            out[f"{prefix}.mlp.{rest}"] = take(key)
    for i in range(config.depth):
        if not config.moe_in_block(i):
            continue
        experts = range(config.num_experts)
        proj = {w: torch.stack([take(f"blocks.{i}.moe.experts.{j}.{w}.weight") for j in experts])
                for w in ("gate_proj", "up_proj", "down_proj")}
        out[f"blocks.{i}.mlp.experts.gate_up_proj"] = torch.cat([proj["gate_proj"], proj["up_proj"]], dim=1)
        out[f"blocks.{i}.mlp.experts.down_proj"] = proj["down_proj"]
    unused = sorted(set(state) - used - {"pos_embed"})
    if unused:
        raise KeyError(f"unexpected keys for this architecture: {unused[:8]}")
    pos_embed = state.get("pos_embed")
    expected = sincos_2d(config.hidden_size, config.input_size // config.patch_size)
    if pos_embed is not None and not torch.allclose(pos_embed.float().reshape(expected.shape), expected, atol=1e-4):
        raise ValueError("the checkpoint's pos_embed is not the 2-D sin-cos table ditmoe computes")
    return out


def load_published(path: str | Path, source: str, *, num_heads: int | None = None, top_k: int = 2) -> DiT:
    """A ditmoe DiT holding a published checkpoint's weights (eval mode)."""
    state = read_state_dict(path)
    config = infer_config(state, source, num_heads=num_heads, top_k=top_k)
    model = DiT(config)
    converted = convert_state_dict(state, config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k != "pos_embed"]
    if missing or unexpected:
        raise KeyError(f"checkpoint {path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model.eval()


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"missing key {key!r}")
    return state[key]

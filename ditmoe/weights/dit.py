"""facebookresearch/DiT's published layout: ditmoe's dense names, plus MAE's 2-D sin-cos ``pos_embed``
stored in the file. The flash-attention names of DiT-MoE's XL/G checkpoints (``attn.Wqkv``,
``attn.out_proj``) are read too; ``from_ditmoe`` writes timm's ``attn.qkv``/``attn.proj``."""

import math
import re

import torch

from ..model.embeddings import sincos_2d

POS_EMBED = "pos_embed"
FLASH_ATTENTION = re.compile(r"(blocks\.\d+\.attn\.)(Wqkv|out_proj)\.")
TIMM_NAMES = {"Wqkv": "qkv", "out_proj": "proj"}
MOE_KEY = re.compile(r"blocks\.\d+\.(moe\.|mlp\.(gate|experts|shared_experts)\.)")


def to_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ditmoe's names in float32; ``pos_embed`` is checked against ditmoe's table and left out (ditmoe computes it)."""
    _reject_experts(state)
    if POS_EMBED in state:
        check_pos_embed(state[POS_EMBED])
    return {_timm_attention(key): value.float() for key, value in state.items() if key != POS_EMBED}


def from_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published layout of a dense ditmoe state: the same names (timm attention), ``pos_embed`` included."""
    _reject_experts(state)
    return dict(state)


def check_pos_embed(pos_embed: torch.Tensor) -> None:
    """ValueError unless ``pos_embed`` (1, T, D) is the sin-cos table ditmoe computes for its grid."""
    dim = pos_embed.shape[-1]
    expected = sincos_2d(dim, math.isqrt(pos_embed.numel() // dim))
    if pos_embed.numel() != expected.numel() or not torch.allclose(
            pos_embed.float().reshape(expected.shape), expected, atol=1e-4):
        raise ValueError("the checkpoint's pos_embed is not the 2-D sin-cos table ditmoe computes")


def _timm_attention(key: str) -> str:
    return FLASH_ATTENTION.sub(lambda m: m[1] + TIMM_NAMES[m[2]] + ".", key, count=1)


def _reject_experts(state: dict[str, torch.Tensor]) -> None:
    experts = sorted(key for key in state if MOE_KEY.match(key))
    if experts:
        raise KeyError(f"unexpected keys for this architecture: {experts[:8]}")


def unwrap_state_dict(state, path) -> dict:
    """The DiT state dict in a loaded facebookresearch/published ``.pt`` (``path``, for messages): the object
    itself or the dict under "ema"/"model"/"state_dict"/"module" (EMA first), "module." prefixes removed."""
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise KeyError(f"checkpoint {path}: no DiT state dict in it (missing 'x_embedder.proj.weight')")
    return {key.removeprefix("module."): value for key, value in state.items()}

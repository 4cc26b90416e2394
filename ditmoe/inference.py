"""Load a trained model from a checkpoint for sampling and evaluation (no DeepSpeed needed)."""

from pathlib import Path

import torch

from .model import DiT, DiTConfig
from .train import checkpoint


def load_model(ckpt: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """EMA (default) or raw model weights of a run/checkpoint directory -> (model in eval mode, meta)."""
    tag_dir = checkpoint.resolve_checkpoint(ckpt)
    meta = checkpoint.read_meta(tag_dir)
    model = DiT(DiTConfig.from_dict(meta["model_config"]))
    if weights == "ema":
        state = checkpoint.load_ema_model_state(tag_dir)
    elif weights == "model":
        state = load_engine_module_state(tag_dir)
    else:
        raise ValueError(f"weights={weights!r} must be 'ema' or 'model'")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "pos_embed"]
    if missing or unexpected:
        raise KeyError(f"checkpoint {tag_dir}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval(), meta


def load_engine_module_state(tag_dir: Path) -> dict:
    """The module weights DeepSpeed saved (ZeRO-0/1/2 keep them whole in mp_rank_00_model_states.pt)."""
    file = tag_dir / "mp_rank_00_model_states.pt"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {file.name}")
    state = torch.load(file, map_location="cpu", weights_only=False)["module"]
    if not state:
        raise ValueError(f"checkpoint {tag_dir}: module weights are partitioned (ZeRO-3); use the EMA weights")
    return {k: v.float() for k, v in state.items()}

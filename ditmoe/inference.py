"""Load a trained model from a checkpoint for sampling and evaluation (no DeepSpeed needed)."""

import json
from pathlib import Path

import torch

from .checkpoint import load_engine_module_state, load_full_ema, read_meta, resolve_checkpoint
from .model import DiT, DiTConfig


def load_model(ckpt: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
               tag: str = "latest") -> tuple[DiT, dict]:
    """EMA (default) or raw model weights of a run/checkpoint directory -> (model in eval mode, meta).
    ``tag`` picks a checkpoint of a run other than its latest. An exported Hugging Face folder
    (``tools/convert_ckpt_to_hf.py``) loads too; it holds one set of weights."""
    if tag == "latest" and is_hf_folder(ckpt):
        from .hf.load import load_hf_folder  # imports transformers (seconds): only when needed

        model, meta = load_hf_folder(ckpt)
        return model.to(device), meta
    tag_dir = resolve_checkpoint(ckpt, tag)
    meta = read_meta(tag_dir)
    model = DiT(DiTConfig.from_dict(meta["model_config"]))
    if weights == "ema":
        state = load_full_ema(tag_dir)
    elif weights == "model":
        state = load_engine_module_state(tag_dir)
    else:
        raise ValueError(f"weights={weights!r} must be 'ema' or 'model'")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "pos_embed"]
    if missing or unexpected:
        raise KeyError(f"checkpoint {tag_dir}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval(), meta


def is_hf_folder(path: str | Path) -> bool:
    """An exported Hugging Face folder of a ditmoe model (config.json with model_type "ditmoe")."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "ditmoe"

"""Load a trained model from a checkpoint for sampling and evaluation (no DeepSpeed needed)."""

import json
from pathlib import Path

import torch

from .model import DiT, DiTConfig
from .train import checkpoint, universal


def load_model(ckpt: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """EMA (default) or raw model weights of a run/checkpoint directory -> (model in eval mode, meta).
    An exported Hugging Face folder (``tools/convert_ckpt_to_hf.py``) loads too; it holds one set of weights."""
    if is_hf_folder(ckpt):
        from .hf.load import load_hf_folder  # imports transformers (seconds): only when needed

        model, meta = load_hf_folder(ckpt)
        return model.to(device), meta
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


def is_hf_folder(path: str | Path) -> bool:
    """An exported Hugging Face folder of a ditmoe model (config.json with model_type "ditmoe")."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "ditmoe"


def load_engine_module_state(tag_dir: Path) -> dict:
    """The trained (non-EMA) weights in ditmoe's names, from any layout: ZeRO-0/1/2 keep them whole in
    ``mp_rank_00_model_states.pt``; ZeRO-3 partitions and AutoEP expert shards are merged through
    DeepSpeed's universal checkpoint (converted once into ``<tag>_universal`` beside the checkpoint)."""
    file = tag_dir / "mp_rank_00_model_states.pt"
    if file.is_file():
        state = torch.load(file, map_location="cpu", weights_only=False)["module"]
        if state and not any(".router.gate." in name for name in state):
            return {k: v.float() for k, v in state.items()}
    elif not any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {file.name} (and no ZeRO-3 model state files)")
    zero = universal.convert(tag_dir) / "zero"
    with torch.device("meta"):
        model = DiT(DiTConfig.from_dict(checkpoint.read_meta(tag_dir)["model_config"]))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    missing = [name for name in shapes if not (zero / name / "fp32.pt").is_file()]
    if missing:
        raise KeyError(f"checkpoint {tag_dir}: universal conversion lacks {missing[:5]}")
    # ZeRO-3 stores flat tensors
    return {name: universal.load_param(zero / name / "fp32.pt").float().reshape(shape) for name, shape in shapes.items()}

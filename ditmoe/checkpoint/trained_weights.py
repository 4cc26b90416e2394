"""The trained (non-EMA) weights of a checkpoint in ditmoe's names, read without a DeepSpeed engine."""

from pathlib import Path

from ..weights import autoep
from ..weights.safe_load import safe_load
from .universal import convert, load_param, param_shapes


def load_engine_module_state(tag_dir: Path) -> dict:
    """The trained weights from any layout: ZeRO-0/1/2 keep them whole in ``mp_rank_00_model_states.pt``;
    ZeRO-3 partitions and AutoEP expert shards are merged through DeepSpeed's universal checkpoint
    (converted once into ``<tag>_universal`` beside the checkpoint)."""
    file = tag_dir / "mp_rank_00_model_states.pt"
    if file.is_file():
        state = module_state(file)
        if state and not any(autoep.is_autoep_name(name) for name in state):
            return {k: v.float() for k, v in state.items()}
    elif not any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {file.name} (and no ZeRO-3 model state files)")
    zero = convert(tag_dir) / "zero"
    shapes = param_shapes(tag_dir)
    missing = [name for name in shapes if not (zero / name / "fp32.pt").is_file()]
    if missing:
        raise KeyError(f"checkpoint {tag_dir}: universal conversion lacks {missing[:5]}")
    # ZeRO-3 stores flat tensors
    return {name: load_param(zero / name / "fp32.pt").float().reshape(shape) for name, shape in shapes.items()}


def module_state(file: Path) -> dict:
    """The weights DeepSpeed saved in a model-states file (its "module")."""
    state = safe_load(file)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"checkpoint file {file}: no 'module' state dict in it")
    return state["module"]

"""Read an exported Hugging Face folder back into ditmoe's DiT without going through transformers'
remote code (for ``tools/sample.py`` and tests)."""

import json
from pathlib import Path

from safetensors.torch import load_file

from ..model import DiT
from ..weights import hf
from .configuration_ditmoe import DiTMoEConfig

SCHEDULER_FILE = "scheduler_config.json"


def load_hf_folder(path: str | Path) -> tuple[DiT, dict]:
    """(model in eval mode, meta with the model config and the objective) of an exported folder. A text model's
    recorded text encoder is ``meta["text_encoder"] = {"name", "max_length"}`` (what sampling reads) and
    ``meta["train_config"]["text_encoder"]``, ``["text_max_length"]``; absent when the folder names none. The
    recorded VAE is ``meta["vae"] = {"name", "scaling_factor"}``, absent when the folder names none."""
    path = Path(path)
    config = DiTMoEConfig.from_json_file(path / "config.json")
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: missing weight file {name}")
        state.update(load_file(path / name))
    model = DiT(config.to_dit_config())
    weights = {k: v.float() for k, v in hf.to_ditmoe(state).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "pos_embed"]
    if missing or unexpected:
        raise KeyError(f"{path}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    schedule_file = path / SCHEDULER_FILE
    if not schedule_file.is_file():
        raise FileNotFoundError(f"{path}: missing {SCHEDULER_FILE}")
    schedule = json.loads(schedule_file.read_text())
    meta = {"model_config": model.config.to_dict(), "train_config": {"objective": schedule["objective"]}}
    if config.text_encoder_name_or_path:
        meta["text_encoder"] = {"name": config.text_encoder_name_or_path, "max_length": config.text_max_length}
        meta["train_config"].update(text_encoder=config.text_encoder_name_or_path,
                                    text_max_length=config.text_max_length)
    if config.vae_name_or_path:
        meta["vae"] = {"name": config.vae_name_or_path, "scaling_factor": config.vae_scaling_factor}
    return model.eval(), meta

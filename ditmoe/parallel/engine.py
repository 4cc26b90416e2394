"""Build the DeepSpeed engine around a single-device model: config, optimizer, ZeRO stage, precision."""

import json
from pathlib import Path

import torch


def deepspeed_config(
    *,
    base: dict | None,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    grad_clip: float,
) -> dict:
    """Fill the batch sizes, clipping, precision and (unless the file sets it) ZeRO stage of a DeepSpeed config.

    One config file thus serves any world size; inconsistent batch sizes are a clear error.
    """
    if global_batch_size % (micro_batch_size * world_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size={micro_batch_size} "
            f"x world_size={world_size}"
        )
    config = dict(base or {})
    config["train_batch_size"] = global_batch_size
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = global_batch_size // (micro_batch_size * world_size)
    config.setdefault("gradient_clipping", grad_clip)
    config.setdefault("zero_optimization", {}).setdefault("stage", zero_stage)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r} must be 'fp32' or 'bf16'")
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    return config


def load_config_file(path: str | None) -> dict | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--deepspeed-config {path}: no such file")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed-config {path}: not valid JSON ({err})") from None


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW; the fused kernel where CUDA is available (no apex needed)."""
    return torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, fused=torch.cuda.is_available()
    )


def initialize(model: torch.nn.Module, optimizer, config: dict):
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer

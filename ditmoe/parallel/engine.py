"""Build the DeepSpeed engine around a single-device model: config, optimizer, ZeRO stage, precision."""

import json
import os
import sys
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
    sizes = {"train_batch_size": global_batch_size, "train_micro_batch_size_per_gpu": micro_batch_size,
             "gradient_accumulation_steps": global_batch_size // (micro_batch_size * world_size)}
    warn_overridden_batch_sizes(config, sizes)
    config.update(sizes)
    config.setdefault("gradient_clipping", grad_clip)
    config.setdefault("zero_optimization", {}).setdefault("stage", zero_stage)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r} must be 'auto', 'fp32' or 'bf16'")
    if precision != "auto":  # "auto" keeps what the config file says (fp32 without a file)
        config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    if uses_bf16(config):  # the overflow scan reads every gradient each step; the trainer checks its losses instead
        config["bf16"] = {"check_grad_overflow": False, **config["bf16"]}
    return config


def warn_overridden_batch_sizes(file_config: dict, sizes: dict) -> None:
    """Batch sizes come from the training settings (``sizes``: DeepSpeed key -> value used): warn once when a
    config file says otherwise, naming both values."""
    differing = [f"{key}={file_config[key]} in the file, {value} used" for key, value in sizes.items()
                 if key in file_config and file_config[key] != value]
    if differing and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: --deepspeed-config batch sizes are overridden by the training settings: "
              f"{'; '.join(differing)}", file=sys.stderr, flush=True)


def uses_bf16(config: dict) -> bool:
    return bool(config.get("bf16", {}).get("enabled", False))


def offloads_optimizer(config: dict) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def load_config_file(path: str | None) -> dict | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--deepspeed-config {path}: no such file")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--deepspeed-config {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed-config {path}: must hold a JSON object of DeepSpeed settings, "
                         f"got {type(config).__name__}")
    for key in ("zero_optimization", "bf16", "fp16", "checkpoint", "expert_parallel"):
        if key in config and not isinstance(config[key], dict):
            raise ValueError(f"--deepspeed-config {path}: {key!r} must be an object, got {config[key]!r}")
    ignored = [key for key in ("optimizer", "scheduler") if key in config]
    if ignored:
        raise ValueError(f"--deepspeed-config {path}: ditmoe builds the optimizer (AdamW: --set lr, weight_decay, "
                         f"adam_beta1, adam_beta2) and the schedule (lr_warmup_steps) itself: remove {ignored[0]!r}")
    return config


def build_optimizer(params, lr: float, weight_decay: float, betas: tuple[float, float],
                    cpu_offload: bool = False):
    """AdamW over ``params`` (tensors or param groups): DeepSpeed's CPU Adam when ZeRO offloads the
    optimizer, else torch's fused AdamW (one kernel for all tensors, no host reads of its step counts; no apex)."""
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True
    )


def initialize(model: torch.nn.Module, optimizer, config: dict):
    """``deepspeed.initialize``; AutoEP's replacements of the MoE layers keep their capacity predictors."""
    import deepspeed

    from .expert_parallel import keep_capacity_predictors

    with keep_capacity_predictors():
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if config["zero_optimization"]["stage"] == 0 and engine.dp_world_size == 1:
        # one rank has nothing to all-reduce: skip DeepSpeed's flatten / all-reduce / copy-back of every gradient
        engine.enable_backward_allreduce = False
    return engine, optimizer

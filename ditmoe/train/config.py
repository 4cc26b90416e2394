"""Training configuration: a dataclass, named training presets, and ``--set`` overrides."""

import dataclasses
from dataclasses import dataclass

from ..config_overrides import apply_overrides
from ..model import DiTConfig, get_preset


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "demo"  # model preset name
    model_overrides: tuple[str, ...] = ()  # KEY=VALUE on the model config
    objective: str = "ddpm"  # "ddpm" or "rectified_flow"
    data: str = "digits"  # "digits" (embedded) or a directory of latent shards
    out: str = "runs/demo"
    steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 0  # 0: global_batch_size / world_size (no accumulation)
    data_workers: int = 0  # loader worker processes per rank
    seed: int = 0
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "auto"  # "fp32", "bf16", or "auto": the DeepSpeed config file's bf16 setting (fp32 without one)
    zero_stage: int = 1  # used unless the DeepSpeed config file sets one
    ep_size: int = 1  # expert parallelism through DeepSpeed AutoEP (1: off)
    activation_checkpointing: int = 0  # recompute every n-th block in backward (0: off, 1: every block)
    deepspeed_config: str | None = None
    resume: str | None = None  # None, "auto", or a checkpoint directory
    resume_universal: bool = False  # resume through DeepSpeed's universal checkpoint (another world/EP size)
    log_every: int = 10
    ckpt_every: int = 500
    tensorboard: bool = True
    # Evaluation at the end of training (digits data): sample grid and conditional accuracy; 0 skips it.
    eval_samples: int = 1000
    eval_sampler: str = "ddim"
    eval_steps: int = 50
    eval_cfg_scale: float = 1.0

    def model_config(self) -> DiTConfig:
        return apply_overrides(get_preset(self.preset), list(self.model_overrides), "model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRAIN_PRESETS = {
    # The embedded default: class-conditional digits on a laptop CPU in a few minutes.
    "demo": TrainConfig(
        preset="demo", data="digits", out="runs/demo", steps=2000, global_batch_size=128, lr=1e-3,
        lr_warmup_steps=100, ema_decay=0.999, log_every=50, ckpt_every=500,
        eval_sampler="ddpm", eval_steps=250, eval_cfg_scale=1.5,
    ),
}


def preset_train_config(preset: str) -> TrainConfig:
    """Training defaults of ``preset``: a training preset, or any model preset with generic defaults."""
    if preset in TRAIN_PRESETS:
        return TRAIN_PRESETS[preset]
    get_preset(preset)  # raises a clear error for unknown names
    return TrainConfig(preset=preset, data="", out=f"runs/{preset.replace('/', '_')}")


def apply_train_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``--set`` items: ``model.KEY=VALUE`` go to the model config, ``KEY=VALUE`` to the training config."""
    model_items = [item[len("model."):] for item in overrides if item.startswith("model.")]
    train_items = [item for item in overrides if not item.startswith("model.")]
    config = apply_overrides(config, train_items, "training")
    config = dataclasses.replace(config, model_overrides=config.model_overrides + tuple(model_items))
    config.model_config()  # validate now: a bad override is an error before anything starts
    return config



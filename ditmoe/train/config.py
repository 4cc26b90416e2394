"""Training configuration: a dataclass, named training presets, experiment files and ``--set`` overrides."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config_file import dump_config, file_format, read_config_file
from ..diffusion import OBJECTIVES as OBJECTIVE_CLASSES
from ..model import DiTConfig, get_preset
from ..model.grouped_gemm import EXPERT_GEMMS
from ..settings import apply_overrides, check_values, format_value
from ..write_errors import staged_file

OBJECTIVES = ("ddpm", "rectified_flow")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
DIGITS_TEXT_ENCODERS = ("tiny", "minilm")
#: Settings that fix a run's data order and noise: a resume never changes them.
DATA_ORDER = ("seed", "global_batch_size")
#: Settings that change what is optimised: a resume changes them only when ``resume_changes`` names them.
RESUME_CHANGES = ("objective", "text_encoder")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the model architecture (which ``preset`` and the model
    overrides give)."""

    preset: str = "demo"  #: Model preset name (a training preset such as 'demo' also sets the training defaults).
    model_overrides: tuple[str, ...] = ()  #: KEY=VALUE items applied to the preset's model config (set as model.KEY).
    objective: str = "ddpm"  #: Training objective: 'ddpm' or 'rectified_flow'.
    data: str = "digits"  #: 'digits', 'digits-t2i' (embedded; with captions) or a directory of latent shards.
    digits_text_encoder: str = "tiny"  #: data='digits-t2i': 'tiny' (a random tiny CLIP) or 'minilm' (pretrained).
    out: str = "runs/demo"  #: Output directory: config, metrics.jsonl, tensorboard/, checkpoints/.
    steps: int = 1000  #: Optimizer steps to train for.
    global_batch_size: int = 256  #: Samples per optimizer step over all ranks.
    micro_batch_size: int = 0  #: Samples per rank per forward/backward (0: global_batch_size / world_size).
    data_workers: int = 2  #: Data loader worker processes per rank (batches pinned for the GPU when one is used).
    seed: int = 0  #: Random seed of initialization, data order and noise.
    lr: float = 1e-4  #: Peak AdamW learning rate.
    lr_warmup_steps: int = 0  #: Steps of linear learning rate warmup.
    lr_schedule: str = "constant"  #: After warm-up: 'constant' or 'cosine' (to lr_final_fraction · lr at the end).
    lr_final_fraction: float = 0.0  #: The cosine schedule's last learning rate as a fraction of lr.
    weight_decay: float = 0.0  #: AdamW weight decay.
    adam_beta1: float = 0.9  #: AdamW beta1.
    adam_beta2: float = 0.999  #: AdamW beta2.
    grad_clip: float = 1.0  #: Gradient norm clipping threshold.
    ema_decay: float = 0.9999  #: Decay of the exponential moving average of the weights.
    precision: str = "auto"  #: 'fp32', 'bf16', or 'auto': the DeepSpeed config file's bf16 setting (fp32 without one).
    zero_stage: int = -1  #: DeepSpeed ZeRO stage 0-3 (a config file's wins); -1: 0 on 1 rank, else the lowest fitting.
    ep_size: int = 1  #: Expert-parallel group size through DeepSpeed AutoEP (1: off).
    activation_checkpointing: int = 0  #: Recompute every n-th block in backward (0: off, 1: every block).
    compile: bool = False  #: Compile each transformer block with torch.compile (regional compilation).
    expert_gemm: str = "auto"  #: Expert GEMMs: 'torch', 'triton' (no host syncs), or 'auto' (Triton where torch syncs).
    deepspeed_config: str | None = None  #: DeepSpeed JSON config file; batch sizes are filled in from these settings.
    resume: str | None = None  #: Checkpoint to resume from: 'auto' (newest complete one in out, if any) or a directory.
    init_from: str | None = None  #: Start from the weights of a tools/upcycle.py folder (fresh optimizer, step 0).
    overwrite: bool = False  #: Start over in an out that holds a run: delete its checkpoints, metrics and events first.
    resume_universal: bool = False  #: Resume through DeepSpeed's universal checkpoint (another world or EP size).
    resume_changes: str = ""  #: Comma-separated settings a resume may change on purpose: objective, text_encoder.
    log_every: int = 10  #: Steps between metrics records.
    max_nonfinite_steps: int = 3  #: Consecutive steps with a NaN/infinite loss or gradient norm that stop training.
    ckpt_every: int = 500  #: Steps between checkpoints.
    tensorboard: bool = True  #: Also write metrics as TensorBoard events.
    val_data: str | None = None  #: Directory of held-out latent shards for the validation loss (digits: built in).
    val_samples: int = 256  #: Held-out samples in the validation loss, each at 8 noise levels (0: no validation).
    val_batch_size: int = 128  #: Items per validation forward: fixed, so the loss is the same on any world size.
    eval_every: int = 500  #: Steps between validation losses, on the EMA and on the trained weights (0: never).
    sample_every: int = 0  #: Steps between sample grids and, on the digits, their quality numbers (0: never).
    sample_samples: int = 500  #: Samples per periodic sampling (digits: equal per class; the grid shows 10 each).
    eval_ref: str | None = None  #: Latent data: ADM reference batch (.npz) for the periodic samples' FID.
    eval_samples: int = 1000  #: Samples of the evaluation at the end of training (digits data); 0 skips it.
    eval_sampler: str = "ddim"  #: Sampler of the final evaluation.
    eval_steps: int = 50  #: Sampling steps of the final evaluation.
    eval_cfg_scale: float = 1.0  #: Classifier-free guidance scale of the final evaluation.
    config_format: str = "toml"  #: Format of the resolved settings file in out: 'toml' or 'yaml' (that of --config).

    def check(self) -> None:
        """Raise a ValueError naming the first setting out of its range."""
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("steps", "global_batch_size", "log_every", "ckpt_every", "eval_steps", "ep_size",
                     "max_nonfinite_steps", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "data_workers", "lr_warmup_steps", "activation_checkpointing", "eval_samples",
                     "lr", "weight_decay", "val_samples", "eval_every", "sample_every", "sample_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        for name in ("ema_decay", "adam_beta1", "adam_beta2", "lr_final_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")

    def _check_choices(self) -> None:
        for name, choices in (("objective", OBJECTIVES), ("precision", PRECISIONS), ("expert_gemm", EXPERT_GEMMS),
                              ("lr_schedule", LR_SCHEDULES), ("digits_text_encoder", DIGITS_TEXT_ENCODERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        samplers = OBJECTIVE_CLASSES[self.objective].samplers
        final_eval = self.eval_samples and self.data in ("digits", "digits-t2i")
        if (final_eval or self.sample_every) and self.eval_sampler not in samplers:
            raise ValueError(f"eval_sampler={self.eval_sampler!r} cannot sample objective {self.objective!r} (the "
                             f"evaluations sample with it): choose one of {', '.join(samplers)}")
        if not self.out.strip():
            raise ValueError("out must name a folder, got '' (which would train into the current directory)")
        unknown = sorted(set(self.resume_change_names()) - set(RESUME_CHANGES))
        if unknown:
            raise ValueError(f"resume_changes: {', '.join(unknown)} cannot be changed on resume; "
                             f"choose from {', '.join(RESUME_CHANGES)}")
        if self.init_from is not None and self.resume is not None:
            raise ValueError("init_from and resume exclude each other: --init-from starts a run from weights, "
                             "--resume continues one")
        if self.resume is not None and self.overwrite:
            raise ValueError("overwrite and resume exclude each other: --overwrite starts over, --resume continues")

    def resume_change_names(self) -> list[str]:
        """The settings ``resume_changes`` names."""
        return [name.strip() for name in self.resume_changes.split(",") if name.strip()]

    def model_config(self) -> DiTConfig:
        return apply_overrides(get_preset(self.preset), list(self.model_overrides), "model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRAIN_PRESETS = {
    # The embedded default: class-conditional digits on a laptop CPU in a few minutes, judged on fidelity and
    # diversity together (docs/training.md#the-demos-numbers). 1000 steps at guidance 3 reached cond_accuracy 1.000
    # with samples 11x further from the data than its floor (pixel FD 0.70) and 39% less varied; 2000 steps make
    # a model good enough for a mild guidance: at 1.1 accuracy 0.97, FD 0.082 (the lowest of 1, 1.1, 1.25, 1.5),
    # diversity 0.92 (benchmarks/digits_frontier.py; docs/training.md#the-demo).
    "demo": TrainConfig(
        preset="demo", data="digits", out="runs/demo", steps=2000, global_batch_size=128, lr=3e-3,
        data_workers=0,  # a digits batch is read in microseconds: worker processes would only compete for cores
        lr_warmup_steps=100, ema_decay=0.999, log_every=50, ckpt_every=500,
        eval_sampler="dpm_solver++", eval_steps=20, eval_cfg_scale=1.1,
        eval_every=250, sample_every=1000, sample_samples=500,
    ),
}
# Text-to-image digits (EC-DiT): the demo's recipe on captions embedded by a tiny frozen text encoder, for 3000
# steps: cross-attention learns the 80 training phrasings later than a label embedding learns 10 classes
# (accuracy on training phrasings ~0.27 after 1000 steps, 1.00 after 3000; a pooled caption term in adaLN
# reaches 0.998 at 3000 too and is off, as in EC-DiT).
TRAIN_PRESETS["demo-t2i"] = dataclasses.replace(TRAIN_PRESETS["demo"], preset="demo-t2i", data="digits-t2i",
                                                out="runs/demo-t2i", steps=3000)

# Text-to-image digits on the pretrained MiniLM text encoder, whose token states mean their digit in words and in
# numerals: after 2000 steps, at guidance 1.5, 1.00 on training captions and held-out templates and 0.91 on the
# digit forms never trained on (0.83 at guidance 1.1, 0.945 at 2 with less diversity; docs/text_to_image.md).
TRAIN_PRESETS["demo-t2i-minilm"] = dataclasses.replace(
    TRAIN_PRESETS["demo-t2i"], preset="demo-t2i-minilm", digits_text_encoder="minilm", out="runs/demo-t2i-minilm",
    steps=2000, eval_cfg_scale=1.5, eval_samples=900, sample_samples=200)


def preset_train_config(preset: str) -> TrainConfig:
    """Training defaults of ``preset``: a training preset, or any model preset with generic defaults."""
    if preset in TRAIN_PRESETS:
        return TRAIN_PRESETS[preset]
    get_preset(preset)  # raises a clear error for unknown names
    return TrainConfig(preset=preset, data="", out=f"runs/{preset.replace('/', '_')}")


def resolve_config(config_file: str | None, flags: dict, overrides: list[str]) -> TrainConfig:
    """Preset defaults < experiment file < ``flags`` (field -> value; ``None``: not given) < ``--set`` items."""
    return apply_settings(read_experiment(config_file) if config_file else ({}, {}), flags, overrides)


def apply_settings(experiment: tuple[dict, dict], flags: dict, overrides: list[str]) -> TrainConfig:
    """Preset defaults < ``experiment`` (training and model settings, from :func:`read_experiment`) < ``flags``
    < ``--set`` items."""
    train, model = experiment
    config = preset_train_config(flags.get("preset") or train.get("preset", "demo"))
    items = tuple(f"{key}={format_value(value)}" for key, value in model.items())
    config = dataclasses.replace(config, **train, model_overrides=config.model_overrides + items)
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    return apply_train_overrides(config, overrides)


def read_experiment(path: str) -> tuple[dict, dict]:
    """Training and model settings of experiment file ``path`` (model fields in a ``model`` table), checked
    against the field types; errors name the file and the key."""
    train = read_config_file(path)
    model = train.pop("model", {})
    try:
        if not isinstance(model, dict):
            raise ValueError(f"'model' must be a table of model settings, got {model!r}")
        train = check_values(TrainConfig, train, "training", exclude=("model_overrides",))
        if "preset" in train:
            get_preset(train["preset"])  # an unknown name is an error of the file
        model = check_values(DiTConfig, model, "model")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return {"config_format": file_format(path), **train}, model


def apply_train_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``--set`` items: ``model.KEY=VALUE`` go to the model config, ``KEY=VALUE`` to the training config."""
    model_items = [item[len("model."):] for item in overrides if item.startswith("model.")]
    train_items = [item for item in overrides if not item.startswith("model.")]
    config = apply_overrides(config, train_items, "training")
    config = dataclasses.replace(config, model_overrides=config.model_overrides + tuple(model_items))
    if config.config_format not in ("toml", "yaml"):
        raise ValueError(f"config_format={config.config_format!r} is not 'toml' or 'yaml'")
    config.check()
    model = config.model_config()  # validate now: a bad override is an error before anything starts
    items = tuple(f"{key}={format_value(getattr(model, key))}" for key in overridden_keys(config))
    return dataclasses.replace(config, model_overrides=items)  # each key once, with its last value


def overridden_keys(config: TrainConfig) -> list[str]:
    """The model fields ``config.model_overrides`` set, each once, in the order first set."""
    return list(dict.fromkeys(item.partition("=")[0] for item in config.model_overrides))


def experiment(config: TrainConfig, model: DiTConfig) -> dict:
    """The experiment file contents that repeat ``config``: training fields, and the model overrides as a
    ``model`` table (the preset gives the rest of the model config); ``model`` is ``config.model_config()``."""
    train = {k: v for k, v in dataclasses.asdict(config).items() if k != "model_overrides"}
    return {**train, "model": {key: getattr(model, key) for key in overridden_keys(config)}}


def write_run_config(config: TrainConfig, out: Path) -> None:
    """Write ``out/config.json`` (the training config and the model config it resolves to) and the experiment
    file that repeats the run, ``out/config.toml`` or ``out/config.yaml`` (``config.config_format``)."""
    model = config.model_config()
    record = {"train": config.to_dict(), "model": model.to_dict()}
    with staged_file(Path(out) / "config.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    header = "# The resolved settings of this run: --config THIS_FILE repeats it. Model settings not in the model\n"
    header += "# table are the preset's (config.json lists the whole model config).\n"
    text = header + dump_config(experiment(config, model), config.config_format)
    with staged_file(Path(out) / f"config.{config.config_format}") as tmp:
        tmp.write_text(text)

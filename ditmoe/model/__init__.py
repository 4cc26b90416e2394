"""Single-device DiT / DiT-MoE model code (no DeepSpeed here; parallelism lives in ditmoe.parallel)."""

from .conditioning import Caption
from .config import DiTConfig
from .dit import DiT
from .presets import PRESETS, get_preset

__all__ = ["Caption", "DiT", "DiTConfig", "PRESETS", "get_preset", "build_model"]


def build_model(config: DiTConfig | str) -> DiT:
    return DiT(get_preset(config) if isinstance(config, str) else config)

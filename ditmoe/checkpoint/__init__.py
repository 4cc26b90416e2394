"""Training checkpoints: layout and tags, ``meta.json``, EMA files, DeepSpeed engine state, universal
conversion, and the trained weights read back without DeepSpeed (which is imported only by the
functions that need it)."""

from .ema import load_full_ema, load_local_ema, save_ema
from .layout import latest_tag_dir, resolve_checkpoint, tag_for_step, universal_dir
from .meta import check_resume_compatible, check_universal_compatible, read_meta, write_meta
from .trained_weights import load_engine_module_state

__all__ = [
    "check_resume_compatible", "check_universal_compatible", "latest_tag_dir", "load_engine_module_state",
    "load_full_ema", "load_local_ema", "read_meta", "resolve_checkpoint", "save_ema", "tag_for_step",
    "universal_dir", "write_meta",
]

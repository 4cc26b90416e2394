"""``meta.json`` of a checkpoint, and whether a run may resume from it."""

import json
from pathlib import Path

from ..model import DiTConfig
from .layout import META


class MissingKey(KeyError):
    """A key missing from a checkpoint file; prints as its message (a plain KeyError prints quoted)."""

    def __str__(self):
        return str(self.args[0])


class Meta(dict):
    """A JSON object of ``meta.json``: a missing key is a KeyError naming the file and the key."""

    def __init__(self, items: dict, file: Path):
        super().__init__(items)
        self.file = file

    def __missing__(self, key):
        raise MissingKey(f"checkpoint file {self.file}: missing key {key!r}")


def read_meta(tag_dir: Path) -> dict:
    """``tag_dir``'s meta.json; a missing key (at any depth) is a KeyError naming the file and the key."""
    file = tag_dir / META
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {META}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"), object_hook=lambda items: Meta(items, file))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint file {file} is not UTF-8 JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint file {file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def write_meta(tag_dir: Path, meta: dict):
    (tag_dir / META).write_text(json.dumps(meta, indent=2))


def check_resume_compatible(meta: dict, model_config: DiTConfig, tag_dir: Path):
    """Raise a ValueError naming every model field the checkpoint was trained with another value of."""
    saved = DiTConfig.from_dict(meta["model_config"]).to_dict()  # settings newer than the checkpoint: defaults
    current = model_config.to_dict()
    diff = sorted(k for k in current if saved.get(k) != current[k])
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in diff)
        raise ValueError(f"checkpoint {tag_dir} was trained with another model config ({details})")


def check_universal_compatible(meta: dict, zero_stage: int, tag_dir: Path):
    """DeepSpeed's universal checkpoints of ZeRO-1/2 and of ZeRO-3 have different layouts: a run may
    change world size and EP size, but not cross between the two families."""
    saved = meta.get("zero_stage")
    if saved is None:
        raise ValueError(f"checkpoint {tag_dir} does not record its ZeRO stage (saved by an older ditmoe); "
                         "resume it with the same topology instead of --resume-universal")
    if saved == 0:  # DeepSpeed converts only ZeRO-1/2/3 optimizer states
        raise ValueError(f"checkpoint {tag_dir} was saved with ZeRO-0 (the default on one rank), which DeepSpeed's "
                         "universal checkpoint cannot convert: resume it on one rank without --resume-universal, "
                         "and train with --zero-stage 1 a run that must move between world sizes")
    if zero_stage == 0:
        raise ValueError(f"this run uses ZeRO-0 (the default on one rank), which DeepSpeed's universal checkpoint "
                         f"cannot load; pass --zero-stage {saved if saved in (1, 2) else 3} to resume {tag_dir}")
    if (saved == 3) != (zero_stage == 3):
        raise ValueError(f"checkpoint {tag_dir} was saved with ZeRO-{saved}; DeepSpeed's universal checkpoint "
                         f"cannot move it to ZeRO-{zero_stage} (ZeRO-1/2 and ZeRO-3 layouts differ): "
                         f"use --zero-stage {3 if saved == 3 else saved}")

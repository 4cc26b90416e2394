"""Initial weights of a run (``python -m ditmoe.train --init-from DIR``): weights only, fresh optimizer, step 0.

The format, written by ``tools/upcycle.py`` (:func:`write_init_weights`) and read by :func:`load_init_weights`:

- ``DIR/upcycled.pt``: ``torch.save`` of a dict name -> fp32 tensor in ditmoe's parameter names, every tensor of
  ``DiT(config).state_dict()`` (``pos_embed`` included), loadable with ``torch.load(weights_only=True)``;
- ``DIR/upcycle.json``: ``{"format": "ditmoe-init-weights", "version": 1, "model_config": {...}, ...}``, the
  model config the weights are for (``DiTConfig.to_dict()``) plus provenance (source, scheme, exactness notes,
  counts of tensors), written after the weights: a folder without it is incomplete.
"""

import json
import os
from pathlib import Path

import torch

from ..model import DiT, DiTConfig
from ..weights.safe_load import safe_load
from ..write_errors import writing

WEIGHTS_FILE = "upcycled.pt"
RECORD_FILE = "upcycle.json"
FORMAT = "ditmoe-init-weights"
VERSION = 1
#: Model fields that change no weight nor the training forward (loss weights, a sampling threshold): the run may
#: set them otherwise than the weights' record. Every other field must be the same.
FREE_FIELDS = frozenset({"balance_loss_alpha", "capacity_predictor_weight", "capacity_threshold"})


def init_files(path: str | Path) -> tuple[Path, Path]:
    """(weights file, record file) of ``path``: the folder, or its ``upcycled.pt``."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS_FILE else path
    return folder / WEIGHTS_FILE, folder / RECORD_FILE


def write_init_weights(folder: str | Path, state: dict[str, torch.Tensor], config: DiTConfig,
                       provenance: dict) -> tuple[Path, Path]:
    """Write ``state`` (the tensors of ``DiT(config)``) and its record into ``folder`` (created); returns
    (weights file, record file).

    Both files are written aside (``NAME.partial``) first: a failed write (a full disk is a ``WriteFailed``
    naming the file) removes them and leaves an earlier upcycled model in ``folder`` as it was. Then the old
    record goes, the weights are renamed into place and the record last, so a folder is never a record beside
    weights it does not describe."""
    weights, record = init_files(folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    staged_weights, staged_record = (path.with_name(path.name + ".partial") for path in (weights, record))
    with writing(weights, staged_weights):
        torch.save({name: tensor.detach().float().contiguous() for name, tensor in state.items()}, staged_weights)
    content = {"format": FORMAT, "version": VERSION, "weights_file": WEIGHTS_FILE, "model_config": config.to_dict(),
               **provenance}
    with writing(record, staged_record, staged_weights):
        staged_record.write_text(json.dumps(content, indent=2))
    record.unlink(missing_ok=True)
    os.replace(staged_weights, weights)
    os.replace(staged_record, record)
    return weights, record


def read_init_record(path: str | Path) -> dict:
    """The record (``upcycle.json``) of init-weights ``path``; errors name the file."""
    weights, record = init_files(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"init weights {path}: no such file or directory")
    if not record.is_file():
        raise FileNotFoundError(f"init weights {path}: missing {record.name} (write the folder with tools/upcycle.py)")
    try:
        content = json.loads(record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"init weights file {record} is not UTF-8 JSON ({err})") from err
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"init weights file {record}: not a {FORMAT!r} record")
    if content.get("version") != VERSION:
        raise ValueError(f"init weights file {record}: version {content.get('version')!r}, this ditmoe reads {VERSION}")
    if not isinstance(content.get("model_config"), dict):
        raise ValueError(f"init weights file {record}: missing its 'model_config'")
    return content


def check_config(record: dict, model_config: DiTConfig, record_file: Path) -> None:
    """ValueError naming ``record_file`` and every model field (outside :data:`FREE_FIELDS`) it records otherwise."""
    try:
        saved = DiTConfig.from_dict(record["model_config"]).to_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"init weights file {record_file}: bad model_config ({err})") from err
    current = model_config.to_dict()
    differ = sorted(key for key in current if key not in FREE_FIELDS and saved.get(key) != current[key])
    if differ:
        details = ", ".join(f"{key}: weights {saved.get(key)!r} vs run {current[key]!r}" for key in differ)
        raise ValueError(f"init weights {record_file} are for another model config ({details}); train with the "
                         f"model config it records (its 'model_config')")


def load_init_weights(path: str | Path, model_config: DiTConfig) -> dict[str, torch.Tensor]:
    """The state dict of init-weights folder ``path`` (or its ``upcycled.pt``) for a run of ``model_config``:
    every tensor of ``DiT(model_config).state_dict()`` with its shape, to ``load_state_dict`` strictly.

    FileNotFoundError for a missing file; ValueError for a config the weights are not for, a damaged file, or a
    missing, unexpected or misshapen tensor; each names the file."""
    weights, record_file = init_files(path)
    record = read_init_record(path)
    check_config(record, model_config, record_file)
    if not weights.is_file():
        raise FileNotFoundError(f"init weights {path}: missing {weights.name}")
    state = safe_load(weights)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init weights file {weights}: not a dict of tensors")
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in DiT(model_config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"init weights file {weights}: missing tensors {missing[:5]}, unexpected tensors "
                       f"{unexpected[:5]}")
    wrong = [f"{name} {tuple(state[name].shape)} (needs {tuple(shape)})" for name, shape in expected.items()
             if state[name].shape != shape]
    if wrong:
        raise ValueError(f"init weights file {weights}: tensors of other shapes: {', '.join(wrong[:5])}")
    return {name: state[name] for name in expected}

"""EMA weights in a checkpoint: ``ema.pt`` (full, ditmoe's names) and, when ranks hold only parts
of the weights (ZeRO-3, expert parallelism), one ``ema_local_rank*.pt`` per rank for exact resume."""

from pathlib import Path

import torch

from ..weights.safe_load import safe_load
from .layout import EMA_FILE, ema_shard_file


def save_ema(tag_dir: Path, rank: int, *, full: dict, local: dict | None):
    """``full``: the full EMA weights (written by rank 0); ``local``: this rank's own EMA tensors, or None."""
    if local is not None:
        torch.save(local, tag_dir / ema_shard_file(rank))
    if rank == 0:
        torch.save(full, tag_dir / EMA_FILE)


def load_local_ema(tag_dir: Path, meta: dict, rank: int) -> dict:
    """The EMA this rank saved: its own shard when the checkpoint has shards, else the full weights."""
    file = tag_dir / (ema_shard_file(rank) if meta.get("ema_shards") else EMA_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {file.name}")
    return safe_load(file)


def load_full_ema(tag_dir: Path) -> dict:
    """Full EMA weights in ditmoe's parameter names."""
    file = tag_dir / EMA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {EMA_FILE}")
    return safe_load(file)

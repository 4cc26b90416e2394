"""Training checkpoints: DeepSpeed engine state plus EMA weights and ``meta.json`` in one tag directory.

Layout: ``OUT/checkpoints/<tag>/`` holds DeepSpeed's files, ``ema.pt`` and ``meta.json`` (step,
model and training config, data position, RNG); ``OUT/checkpoints/latest`` names the newest tag and
is written last, so a crash mid-save leaves the previous checkpoint as the latest.
"""

import json
from pathlib import Path

import torch

from .universal import client_state, universal_dir

META = "meta.json"
EMA_FILE = "ema.pt"


def ema_shard_file(rank: int) -> str:
    """This rank's own EMA tensors (ZeRO-3 partitions / its experts), for exact resume."""
    return f"ema_local_rank{rank:05d}.pt"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag_dir(ckpt_root: Path) -> Path | None:
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return None
    tag_dir = ckpt_root / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{latest} names {tag_dir.name!r}, which does not exist")
    return tag_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its ``checkpoints/`` directory or a tag directory -> the tag directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    for root in (path / "checkpoints", path):
        tag_dir = latest_tag_dir(root)
        if tag_dir is not None:
            return tag_dir
    if (path / META).is_file():
        return path
    raise FileNotFoundError(f"checkpoint {path}: no {META} and no 'latest' file in it or in {path / 'checkpoints'}")


def read_meta(tag_dir: Path) -> dict:
    file = tag_dir / META
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {META}")
    return json.loads(file.read_text())


def save(engine, ckpt_root: Path, step: int, *, ema_full: dict, ema_local: dict | None, meta: dict, rank: int):
    """``ema_full``: full EMA weights in ditmoe's names (rank 0); ``ema_local``: each rank's own EMA
    tensors when they are not the full weights (ZeRO-3, expert parallelism), else None."""
    tag = tag_for_step(step)
    tag_dir = ckpt_root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    ema_shards = 0
    if ema_local is not None:
        torch.save(ema_local, tag_dir / ema_shard_file(rank))
        ema_shards = meta["world_size"]
    if rank == 0:
        torch.save(ema_full, tag_dir / EMA_FILE)
    if rank == 0:
        (tag_dir / META).write_text(json.dumps({**meta, "step": step, "tag": tag, "ema_shards": ema_shards}, indent=2))
    engine.save_checkpoint(str(ckpt_root), tag=tag,  # collective; writes 'latest' last
                           client_state=client_state(meta["train_config"]["ep_size"]))


def load(engine, tag_dir: Path, rank: int) -> tuple[dict, dict]:
    """Restore the engine (module, optimizer, scheduler) from ``tag_dir``; returns (meta, this rank's EMA)."""
    meta = read_meta(tag_dir)
    ema_file = tag_dir / (ema_shard_file(rank) if meta.get("ema_shards") else EMA_FILE)
    if not ema_file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {ema_file.name}")
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {tag_dir}: DeepSpeed found no engine state to load")
    return meta, torch.load(ema_file, map_location="cpu")


def load_universal(engine, tag_dir: Path) -> dict:
    """Restore the engine from ``<tag>_universal`` (needs ``checkpoint.load_universal`` in the
    DeepSpeed config), re-sharded for this run's topology; returns the meta."""
    meta = read_meta(tag_dir)
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=universal_dir(tag_dir).name)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {universal_dir(tag_dir)}: DeepSpeed found no engine state to load")
    return meta


def load_ema_model_state(tag_dir: Path) -> dict:
    """Full EMA weights in ditmoe's parameter names."""
    file = tag_dir / EMA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {EMA_FILE}")
    return torch.load(file, map_location="cpu")

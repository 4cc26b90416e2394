"""Where a training checkpoint lives: tag directories, the ``latest`` file, the EMA and meta files.

Layout: ``OUT/checkpoints/<tag>/`` holds DeepSpeed's files, ``ema.pt`` and ``meta.json`` (step,
model and training config, data position, RNG); ``OUT/checkpoints/latest`` names the newest tag and
is written last, so a crash mid-save leaves the previous checkpoint as the latest.
"""

import os
from pathlib import Path

META = "meta.json"
EMA_FILE = "ema.pt"
LATEST = "latest"


def ema_shard_file(rank: int) -> str:
    """This rank's own EMA tensors (ZeRO-3 partitions / its experts), for exact resume."""
    return f"ema_local_rank{rank:05d}.pt"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def universal_dir(tag_dir: Path) -> Path:
    """Where DeepSpeed's universal checkpoint of ``tag_dir`` is converted to."""
    return tag_dir.with_name(tag_dir.name + "_universal")


def latest_tag_dir(ckpt_root: Path) -> Path | None:
    """The tag directory ``ckpt_root/latest`` names, or None without that file."""
    latest = ckpt_root / LATEST
    if not latest.is_file():
        return None
    tag_dir = ckpt_root / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{latest} names {tag_dir.name!r}, which does not exist")
    return tag_dir


def write_latest(tag_dir: Path):
    """Name ``tag_dir`` in the ``latest`` file beside it: written aside and renamed, so a failed write
    (a full disk) leaves the previous ``latest`` whole."""
    latest = tag_dir.parent / LATEST
    staging = latest.with_name(LATEST + ".partial")
    staging.write_text(tag_dir.name)
    os.replace(staging, latest)


def resolve_checkpoint(path: str | Path, tag: str = "latest") -> Path:
    """A run directory, its ``checkpoints/`` directory or a tag directory -> the tag directory.

    ``tag`` other than "latest" picks that tag of a run or ``checkpoints/`` directory.
    """
    path = Path(path)
    if tag != LATEST:
        return resolve_checkpoint(_tag_candidate(path, tag))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    for root in (path / "checkpoints", path):
        tag_dir = latest_tag_dir(root)
        if tag_dir is not None:
            return tag_dir
    if (path / META).is_file():
        return path
    raise FileNotFoundError(f"checkpoint {path}: no {META} and no 'latest' file in it or in {path / 'checkpoints'}")


def _tag_candidate(path: Path, tag: str) -> Path:
    for candidate in (path / "checkpoints" / tag, path / tag):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"checkpoint {path}: no tag {tag!r} in it or in {path / 'checkpoints'}")

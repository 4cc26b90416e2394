"""DeepSpeed engine state (module, optimizer, scheduler) of a checkpoint, saved and restored beside
the EMA and meta files."""

from pathlib import Path

from .ema import save_ema
from .layout import universal_dir
from .meta import write_meta


def client_state(ep_size: int) -> dict:
    """What ``save_checkpoint`` must add so that ``ds_to_universal`` accepts a run without EP
    (with EP, AutoEP writes its own ``universal_checkpoint_info``)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    if ep_size > 1:
        return {}
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def save(engine, tag_dir: Path, *, meta: dict, ema_full: dict, ema_local: dict | None, rank: int, ep_size: int):
    """Write checkpoint ``tag_dir`` (a collective): EMA files, ``meta.json`` (rank 0), then DeepSpeed's
    files, which end with the ``latest`` file beside ``tag_dir``.

    ``ema_full``: full EMA weights in ditmoe's names (rank 0); ``ema_local``: each rank's own EMA
    tensors when they are not the full weights (ZeRO-3, expert parallelism), else None.
    """
    tag_dir.mkdir(parents=True, exist_ok=True)
    save_ema(tag_dir, rank, full=ema_full, local=ema_local)
    if rank == 0:
        write_meta(tag_dir, meta)
    engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=client_state(ep_size))


def load(engine, tag_dir: Path):
    """Restore the engine from ``tag_dir``, saved under this run's topology."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {tag_dir}: DeepSpeed found no engine state to load")


def load_universal(engine, tag_dir: Path):
    """Restore the engine from ``<tag>_universal`` (needs ``checkpoint.load_universal`` in the
    DeepSpeed config), re-sharded for this run's topology."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=universal_dir(tag_dir).name)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {universal_dir(tag_dir)}: DeepSpeed found no engine state to load")

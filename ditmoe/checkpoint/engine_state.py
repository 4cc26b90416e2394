"""DeepSpeed engine state (module, optimizer, scheduler) of a checkpoint, saved and restored beside
the EMA and meta files."""

from pathlib import Path

from ..write_errors import WriteFailed, write_failure
from .ema import save_ema
from .layout import LATEST, universal_dir, write_latest
from .meta import write_meta
from .verify import verify_dir


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
    """Write checkpoint ``tag_dir`` (a collective): EMA files, ``meta.json`` (rank 0), DeepSpeed's files,
    then (rank 0, once every rank has written its files) the ``latest`` file beside ``tag_dir``.

    ``ema_full``: full EMA weights in ditmoe's names (rank 0); ``ema_local``: each rank's own EMA
    tensors when they are not the full weights (ZeRO-3, expert parallelism), else None. A full disk
    is an OSError saying so, and ``latest`` still names the previous checkpoint.
    """
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        save_ema(tag_dir, rank, full=ema_full, local=ema_local)
        if rank == 0:
            write_meta(tag_dir, meta)
        # DeepSpeed's own ``latest`` is written without waiting for the other ranks, and in place
        engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=client_state(ep_size),
                               save_latest=False)  # ends with a barrier: every rank's files are written
        if rank == 0:
            write_latest(tag_dir)
    except (OSError, RuntimeError) as err:
        failure = write_failure(err, tag_dir)
        if failure is None:
            raise
        raise WriteFailed(f"{failure}; {LATEST} still names the previous checkpoint") from err


def load(engine, tag_dir: Path):
    """Restore the engine from ``tag_dir``, saved under this run's topology (a collective), once its
    files are checked (:func:`~.verify.verify_dir`)."""
    model_states = tag_dir / model_states_name(engine)
    if not model_states.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir}: missing {model_states.name}")
    verify_dir(tag_dir)
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {tag_dir}: DeepSpeed found no engine state to load")


def load_universal(engine, tag_dir: Path):
    """Restore the engine from ``<tag>_universal`` (needs ``checkpoint.load_universal`` in the
    DeepSpeed config), re-sharded for this run's topology. A collective; the files are checked first."""
    verify_dir(universal_dir(tag_dir))
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=universal_dir(tag_dir).name)
    if load_path is None:
        raise FileNotFoundError(f"checkpoint {universal_dir(tag_dir)}: DeepSpeed found no engine state to load")


def model_states_name(engine) -> str:
    """The model-states file DeepSpeed reads on this rank (ditmoe has no tensor or pipeline parallelism,
    so the data-parallel rank of ZeRO-3's partitions is the global rank)."""
    if engine.zero_optimization_partition_weights():
        return f"zero_pp_rank_{engine.global_rank}_mp_rank_00_model_states.pt"
    return "mp_rank_00_model_states.pt"

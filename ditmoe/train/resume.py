"""Resuming a run: which checkpoint, whether it fits this run, and restoring engine, EMA, data and RNG.

Two moments: :meth:`Resume.detect` before the engine exists (checks the checkpoint; for
``--resume-universal`` converts it and tells DeepSpeed to load the universal form), and
:meth:`Resume.restore` once the engine, EMA and loader are built.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import checkpoint
from ..checkpoint import engine_state, universal
from .config import DATA_ORDER, RESUME_CHANGES, TrainConfig
from .run_dir import RunFolder


def find_resume(config: TrainConfig, run_folder: RunFolder, rank: int) -> Path | None:
    """The tag directory ``--resume`` names: for "auto" the run's latest or newest complete one (None if it
    has none)."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        tag_dir, note = run_folder.auto_resume_tag()
        if note and rank == 0:
            print(f"--resume auto: {note}", flush=True)
        return tag_dir
    return checkpoint.resolve_checkpoint(config.resume)


def check_resume_settings(meta: dict, config: TrainConfig, text_encoder: dict | None, tag_dir: Path) -> None:
    """Raise a ValueError naming every setting this run would change from the checkpoint's: the data order
    (``DATA_ORDER``) never, what is optimised (``RESUME_CHANGES``) only when ``config.resume_changes`` names it."""
    saved = dict(meta.get("train_config", {}))
    if "text_encoder" in meta:  # recorded since text-to-image training
        saved["text_encoder"] = meta["text_encoder"]
    now = {**config.to_dict(), "text_encoder": text_encoder}
    changed = [name for name in (*DATA_ORDER, *RESUME_CHANGES) if name in saved and saved[name] != now[name]]
    refused = [name for name in changed if name not in config.resume_change_names()]
    if not refused:
        return
    details = ", ".join(f"{name}: checkpoint {saved[name]!r} vs now {now[name]!r}" for name in refused)
    fixed = [name for name in refused if name in DATA_ORDER]
    how = (f"{', '.join(fixed)} fix the data order and noise of a run: start a new run to change them" if fixed else
           f"pass --set resume_changes={','.join(refused)} to change {'it' if len(refused) == 1 else 'them'} on "
           "purpose (recorded in the checkpoints)")
    raise ValueError(f"checkpoint {tag_dir} was trained with other settings ({details}); {how}")


def check_same_zero_family(meta: dict, zero_stage: int, tag_dir: Path) -> None:
    """ZeRO-0, ZeRO-1/2 and ZeRO-3 checkpoints hold different optimizer files: a resume stays in the checkpoint's
    family (``--resume-universal`` changes the world or EP size within ZeRO-1/2 or within ZeRO-3)."""
    saved = meta.get("zero_stage")
    family = {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
    if saved is not None and family[saved] != family[zero_stage]:
        raise ValueError(f"checkpoint {tag_dir} was saved with ZeRO-{saved}, this run uses ZeRO-{zero_stage}: "
                         f"pass --zero-stage {saved} to resume it")


@dataclass(frozen=True)
class Resume:
    tag_dir: Path
    universal: bool  # another topology: through DeepSpeed's universal checkpoint

    @classmethod
    def detect(cls, config: TrainConfig, run_folder: RunFolder, ds_config: dict, rank: int,
               text_encoder: dict | None = None) -> "Resume | None":
        """The resume plan of this run (``text_encoder``: that of its captions), or None. Collective with
        ``--resume-universal``: rank 0 converts the checkpoint while the others wait; ``ds_config`` is then set
        to load the universal form."""
        tag_dir = find_resume(config, run_folder, rank)
        if tag_dir is None:
            return None
        meta = checkpoint.read_meta(tag_dir)
        checkpoint.check_resume_compatible(meta, config.model_config(), tag_dir)
        check_resume_settings(meta, config, text_encoder, tag_dir)
        if not config.resume_universal:
            check_same_zero_family(meta, ds_config["zero_optimization"]["stage"], tag_dir)
        else:
            checkpoint.check_universal_compatible(meta, ds_config["zero_optimization"]["stage"], tag_dir)
            if rank == 0:
                universal.convert(tag_dir)
            if dist.is_initialized():
                dist.barrier()
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        return cls(tag_dir, bool(config.resume_universal))

    def restore(self, engine, ema, loader, rank: int) -> int:
        """Load engine state, EMA, data position and RNG; returns the step to continue from."""
        meta = checkpoint.read_meta(self.tag_dir)
        if self.universal:  # re-shard the engine state, cut this rank's EMA from ema.pt
            engine_state.load_universal(engine, self.tag_dir)
            ema.load_full(checkpoint.load_full_ema(self.tag_dir), engine.module)
        else:
            ema_state = checkpoint.load_local_ema(self.tag_dir, meta, rank)
            engine_state.load(engine, self.tag_dir)
            ema.load_state_dict(ema_state)
        loader.load_state_dict(meta["data"])
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
        if rank == 0:
            print(f"resumed from {self.tag_dir} at step {meta['step']}", flush=True)
        return meta["step"]


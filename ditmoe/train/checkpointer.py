"""When to checkpoint (every ``ckpt_every`` steps, at the last step, on preemption) and what goes in."""

from collections.abc import Callable
from pathlib import Path

import torch

from .. import checkpoint
from ..checkpoint import engine_state
from ..parallel.expert_parallel import gather_full_state_dict
from .config import TrainConfig
from .preemption import PreemptionGuard


class Checkpointer:
    def __init__(self, config: TrainConfig, ckpt_root: Path, *, rank: int, world_size: int, zero_stage: int,
                 guard: PreemptionGuard | None = None, verify: Callable[[], None] | None = None,
                 text_encoder: dict | None = None, vae: dict | None = None):
        """``verify()`` runs before every save and raises if the state must not be saved (non-finite losses);
        ``text_encoder`` ({"name", "max_length"}: what the captions were embedded with) and ``vae``
        ({"name", "scaling_factor"}: the data's VAE, which decodes samples into images) go into every meta."""
        self.text_encoder = text_encoder
        self.vae = vae
        self.config = config
        self.verify = verify
        self.ckpt_root = ckpt_root
        self.rank = rank
        self.world_size = world_size
        self.zero_stage = zero_stage
        self.guard = guard

    def is_due(self, step: int, preempted: bool = False) -> bool:
        return step % self.config.ckpt_every == 0 or step == self.config.steps or preempted

    def after_step(self, step: int, engine, ema, loader) -> bool:
        """Collective, after optimizer step ``step``: save when due; True when preempted (stop training)."""
        preempted = self.guard is not None and self.guard.should_stop()
        if self.is_due(step, preempted):
            self.save(step, engine, ema, loader)
        if preempted and self.rank == 0:
            print(f"preempted: saved checkpoint at step {step}; rerun with --resume auto to continue", flush=True)
        return preempted

    def save(self, step: int, engine, ema, loader):
        """Collective: checkpoint ``step`` with the EMA gathered to full weights on rank 0."""
        if self.verify is not None:
            self.verify()
        ema_local = ema.state_dict()
        sharded = ema.partitioned or self.config.ep_size > 1  # ranks hold parts of the weights
        meta = self.meta(step, loader.state_dict(), ema_shards=self.world_size if sharded else 0)
        ema_full = gather_full_state_dict(engine, ema_local)  # collective
        engine_state.save(engine, self.ckpt_root / meta["tag"], meta=meta, ema_full=ema_full,
                          ema_local=ema_local if sharded else None, rank=self.rank, ep_size=self.config.ep_size)

    def meta(self, step: int, data_state: dict, *, ema_shards: int) -> dict:
        """``meta.json``: what resuming needs besides DeepSpeed's engine state (and the RNG taken now)."""
        return {
            "model_config": self.config.model_config().to_dict(), "train_config": self.config.to_dict(),
            "data": data_state, "rng": torch.get_rng_state().tolist(), "world_size": self.world_size,
            "zero_stage": self.zero_stage, "step": step, "tag": checkpoint.tag_for_step(step), "ema_shards": ema_shards,
            "text_encoder": self.text_encoder, "vae": self.vae,
        }

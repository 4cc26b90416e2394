"""Exponential moving average of model weights, kept in fp32.

Every rank averages only the tensors it holds: under ZeRO-3 its partition of each parameter
(``ds_tensor``), under expert parallelism its own experts. The EMA thus costs no communication and
no more memory than the weights; ``gather_full_state_dict(engine, ema.state_dict())`` assembles the
full EMA weights at checkpoint time.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that in short runs the
average is not dominated by the untrained initial weights (with 0.999 and no warm-up, 13% of the
average after 2000 steps would still be the zero-initialised start). It only depends on the step,
so resuming needs no extra state.
"""

import contextlib

import torch
from torch import nn

from ..parallel.expert_parallel import local_state_from_full


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        """Build from the model as DeepSpeed holds it (after ``deepspeed.initialize``)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.partitioned = is_partitioned(model)
        self.shadow = {name: local_tensor(p).detach().float().clone() for name, p in model.named_parameters()}
        # the tensors averaged, in shadow order: Parameter / partition objects stay the same when DeepSpeed
        # rebinds their storage, so the list is built once
        self._sources = [local_tensor(p) for p in model.parameters()]
        self._targets = list(self.shadow.values())
        self._same_dtype = all(s.dtype == t.dtype for s, t in zip(self._sources, self._targets))

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, num_updates: int):
        """Fold in the model's weights after ``num_updates`` previous updates (the training step, 0-based):
        one fused multi-tensor operation, without fp32 copies of bf16 weights."""
        weight = 1.0 - self.decay_at(num_updates)
        if self._same_dtype:
            torch._foreach_lerp_(self._targets, self._sources, weight)
        else:  # (1 - w)·shadow + w·p, p upcast inside the kernel
            torch._foreach_mul_(self._targets, 1.0 - weight)
            torch._foreach_add_(self._targets, self._sources, alpha=weight)

    def local_weights(self) -> list[torch.Tensor]:
        """The model tensors this rank averages (its ZeRO-3 partitions, its experts)."""
        return list(self._sources)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks parameter(s): {missing[:5]}")
        for name in self.shadow:  # the full export also holds buffers (pos_embed): not averaged
            value = state[name]
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name}: shape {tuple(value.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Collective under ZeRO-3: the EMA weights in ``model`` (each rank writes its own part) for the duration of
        the block, the trained weights back after it, bit for bit. Costs one copy of this rank's weights."""
        trained = [t.detach().clone() for t in self._sources]
        self._write(model, self._targets)
        try:
            yield
        finally:
            self._write(model, trained)

    @torch.no_grad()
    def _write(self, model: nn.Module, values: list[torch.Tensor]):
        torch._foreach_copy_(self._sources, values)
        # ZeRO-3 keeps small parameters gathered between steps ("persistent"): gather them again from the
        # partitions just written, as DeepSpeed does after an optimizer step
        gathered = [p for p in model.parameters() if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"]
        if gathered:
            gathered[0].all_gather(gathered)

    def load_full(self, full: dict[str, torch.Tensor], model: nn.Module):
        """Load the full EMA weights in ditmoe's names (``ema.pt``) under any ZeRO/EP layout:
        each rank keeps its own part of them."""
        self.load_state_dict(local_state_from_full(model, full))

"""Exponential moving average of model weights, kept in fp32.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that in short runs the
average is not dominated by the untrained initial weights (with 0.999 and no warm-up, 13% of the
average after 2000 steps would still be the zero-initialised start). It only depends on the step,
so resuming needs no extra state.
"""

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int):
        """Fold in the weights after ``num_updates`` previous updates (the training step, 0-based)."""
        weight = 1.0 - self.decay_at(num_updates)
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks parameter(s): {missing[:5]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)

"""Rectified flow objective (DiT-MoE's flow variant) with an Euler sampler.

Path: x_t = (1 - t) x_0 + t eps, t in (0, 1); t = 1 is pure noise. The model regresses the
constant velocity eps - x_0 with a per-sample mean squared error, and t is drawn logit-normal:
t = sigmoid(m + s * n), n ~ N(0, 1).

Time given to the model: ``time_scale * t``. DiT-MoE's official ``diffusion/rectified_flow.py``
passes t itself (in [0, 1], both in training and in its Euler sampler), so the default is
``time_scale=1.0``; use 1000.0 for a timestep embedder tuned to DDPM-style indices. The time
tensor given to the model is float32 (float64 for float64 data) to keep t precise under bf16.

When the model returns 2C channels (a learned-sigma head kept for architecture parity), the
first C channels are the velocity and the rest are ignored.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .guidance import Model
from .objective import Objective


def _bcast(t: Tensor, ref: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) matching ref's rank."""
    return t.reshape(-1, *([1] * (ref.ndim - 1)))


class RectifiedFlow(Objective):
    """Velocity-matching flow objective between data (t=0) and Gaussian noise (t=1); Euler sampler (50 steps)."""

    samplers: ClassVar[dict[str, int]] = {"euler": 50}
    default_sampler: ClassVar[str] = "euler"

    def __init__(self, time_scale: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0):
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.time_scale = float(time_scale)
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def sample_t(self, n: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Logit-normal times (n,) in (0, 1), float32, from ``generator`` (torch's global RNG if None);
        median sigmoid(m)."""
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t eps, computed in t's precision and returned in x0's dtype."""
        tb = _bcast(t, x0)
        return ((1.0 - tb) * x0.to(t.dtype) + tb * noise.to(t.dtype)).to(x0.dtype)

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        """d x_t / d t = eps - x_0."""
        return noise - x0

    def velocity(self, model: Model, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Model velocity at (x, t): calls ``model(x, time_scale * t, y)``, keeps the first C channels."""
        return self._velocity_channels(model(x, t * self.time_scale, y), x.shape[1])

    @staticmethod
    def _velocity_channels(out: Tensor, channels: int) -> Tensor:
        """The velocity: the first C channels of a model output of C or 2C (learned-σ models) channels."""
        if out.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"model returned {out.shape[1]} channels, expected {channels} or {2 * channels}")
        return out[:, :channels]

    def training_losses(
        self, model: Model, x0: Tensor, y: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample (N,) 'loss' == 'mse' and zero 'vb'. ``t`` then ``noise`` default to draws
        from ``generator`` (torch's global RNG if None) on x0's device."""
        work = torch.promote_types(x0.dtype, torch.float32)
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = t.to(work)
        x_t = self.interpolate(x0, noise, t)  # (N, C, H, W)
        return self.loss_terms(model(x_t, t * self.time_scale, y), x0, x_t, noise, t)

    def loss_terms(self, model_out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> dict[str, Tensor]:
        """'loss' == 'mse' and zero 'vb' (N,) of a model output at (x_t, t) for the data x0 and ``noise``: the
        loss arithmetic after the model call (``torch.compile`` takes it whole)."""
        work = torch.promote_types(x0.dtype, torch.float32)
        v_pred = self._velocity_channels(model_out, x0.shape[1]).to(work)
        target = self.velocity_target(x0.to(work), noise.to(work))
        mse = ((target - v_pred) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}

    def _run_sampler(
        self, net: Model, noise: Tensor, y: Tensor, sampler: str, steps: int, *, eta: float, clip_denoised: bool,
        progress: bool
    ) -> Tensor:
        """Integrate dx/dt = v from t=1 (``noise``) to t=0 with ``steps`` Euler steps, evaluating the
        velocity at t = k/steps for k = steps..1. Deterministic: ``eta`` is unused."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if clip_denoised:
            raise ValueError("clip_denoised=True is not supported by RectifiedFlow")
        work = torch.promote_types(noise.dtype, torch.float32)
        x = noise.to(work)
        dt = 1.0 / steps
        indices = range(steps, 0, -1)
        if progress:
            indices = tqdm(indices, desc="euler sampling")
        for k in indices:
            t = torch.full((noise.shape[0],), k / steps, dtype=work, device=noise.device)
            v = self.velocity(net, x.to(noise.dtype), t, y)
            x = x - dt * v.to(work)
        return x.to(noise.dtype)

"""DPM-Solver++ (Lu et al., 2022), multistep, in data-prediction form, for GaussianDiffusion.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and the data
prediction D_t = (x_t - sigma_t eps(x_t, t)) / alpha_t, one step s -> t (h = lambda_t - lambda_s) is

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D,
    order 1: D = D_s                                                (exactly deterministic DDIM)
    order 2: D = (1 + 1/(2r)) D_s - 1/(2r) D_prev,  r = h_prev / h    (the paper's multistep "2M" update)

The solver calls the model once at each given timestep (noisiest first, normally T-1 down to 0), then
takes a final step to clean data (sigma = 0, lambda = inf), which returns D at the last timestep. The
first step (no history yet) and that final step (r = 0 there) use order 1, the paper's lower-order start
and end. Only the eps channels of the model output are used; a learned variance is ignored, as in DDIM.

Default timesteps are uniform in lambda (the paper's "logSNR" spacing, under which its 2M update has
r = 1). Uniform-in-t spacing of the linear schedule ends with a jump in lambda several times larger than
the step before it (t = 53 -> 0 at 20 steps: h = 2.9 after 0.66), where the 2nd-order extrapolation
overshoots; on Gaussian data it is then less accurate than DDIM (tests/diffusion/test_dpm_solver.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .guidance import Model

ORDERS = (1, 2)


class EpsProcess(Protocol):
    """What the solver needs of a discrete eps-prediction process (GaussianDiffusion is one)."""

    alphas_cumprod: np.ndarray  # (T,) float64

    def model_timesteps(self, t: Tensor) -> Tensor: ...

    def split_output(self, model_out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]: ...

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor: ...


def logsnr_timesteps(alphas_cumprod: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` distinct int64 timesteps from T-1 down to 0, nearest to uniform spacing in lambda.

    ``alphas_cumprod`` is the (T,) schedule. Where rounding would repeat a timestep (near t = 0, for
    many steps) the noisier one moves up by one, so the model is called exactly ``steps`` times.
    """
    num_timesteps = len(alphas_cumprod)
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} for dpm_solver++ must be between 2 and {num_timesteps}")
    lam = 0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))  # (T,) decreasing in t
    targets = np.linspace(lam[0], lam[-1], steps)  # (K,) clean end first
    order = np.arange(num_timesteps)[::-1]
    rounded = np.rint(np.interp(targets, lam[::-1], order)).astype(np.int64)  # (K,) increasing
    for k in range(1, steps):
        rounded[k] = max(rounded[k], rounded[k - 1] + 1)
    rounded = np.minimum(rounded, np.arange(num_timesteps - steps, num_timesteps))  # stays below T
    return rounded[::-1].copy()


def _coefficients(alphas_cumprod: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step k (from the k-th visited point to the next, the last one to clean data), each (K,):
    sigma_t / sigma_s, alpha_t (1 - e^{-h}) and h (inf for the last step). Input: abar, noisiest first."""
    abar_t = np.append(alphas_cumprod[1:], 1.0)
    alpha_s, sigma_s = np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)
    alpha_t, sigma_t = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
    ratio = sigma_t / sigma_s
    data_weight = alpha_t - ratio * alpha_s  # = alpha_t (1 - e^{-h}), finite at sigma_t = 0
    with np.errstate(divide="ignore"):
        h = np.log(alpha_t / sigma_t) - np.log(alpha_s / sigma_s)
    return ratio, data_weight, h


def dpm_solver_sample(
    diffusion: EpsProcess,
    model: Model,
    noise: Tensor,
    y: Tensor,
    timesteps: np.ndarray,
    *,
    order: int = 2,
    clip_denoised: bool = False,
    progress: bool = False,
) -> Tensor:
    """x_0 (N, C, H, W) from x = ``noise`` at ``timesteps[0]``; one model call per timestep.

    ``timesteps`` are strictly decreasing step indices of ``diffusion``; ``model(x, t, y)`` receives
    them mapped by ``diffusion.model_timesteps``. The state is kept in at least float32; the result
    has noise's dtype.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not supported by DPM-Solver++; valid choices: {list(ORDERS)}")
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if timesteps.ndim != 1 or len(timesteps) == 0 or (np.diff(timesteps) >= 0).any():
        raise ValueError(f"timesteps must be a non-empty strictly decreasing 1-D sequence, got {timesteps}")
    ratio, data_weight, h = _coefficients(diffusion.alphas_cumprod[timesteps])
    work = torch.promote_types(noise.dtype, torch.float32)
    x = noise.to(work)  # (N, C, H, W)
    previous = None  # D at the previous timestep, (N, C, H, W)
    steps = range(len(timesteps))
    if progress:
        steps = tqdm(steps, desc="dpm_solver++ sampling")
    for i in steps:
        t = torch.full((noise.shape[0],), int(timesteps[i]), dtype=torch.long, device=noise.device)
        model_out = model(x.to(noise.dtype), diffusion.model_timesteps(t), y)
        eps, _ = diffusion.split_output(model_out.to(work), x.shape[1])
        data = diffusion.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            data = data.clamp(-1.0, 1.0)
        direction = data
        if order == 2 and previous is not None and np.isfinite(h[i]):
            half_inv_r = 0.5 * h[i] / h[i - 1]
            direction = (1.0 + half_inv_r) * data - half_inv_r * previous
        x = float(ratio[i]) * x + float(data_weight[i]) * direction
        previous = data
    return x.to(noise.dtype)

"""DDPM Gaussian diffusion with learned-range variance (improved DDPM / DiT conventions).

Schedule constants are float64 numpy arrays. Arithmetic on tensors runs in at least float32
(float64 inputs stay float64); sampler states and ``q_sample`` keep the dtype of their input,
so fp32 and bf16 latents both work.

Variance parameterisation:
* ``learn_sigma=True``: the model returns (N, 2C, H, W) = [eps, v]. With frac = (v + 1) / 2 the
  log-variance is ``frac * log(beta_t) + (1 - frac) * log(posterior_variance_t)`` (the latter
  clipped at t=0 to its t=1 value).
* ``learn_sigma=False``: the model returns eps only and the variance is fixed to beta_t
  (posterior variance at t=0), DiT's default "fixed large" choice.

Training loss (improved DDPM "hybrid", as DiT trains): ``loss = mse + vb`` where
``mse`` is the per-sample mean of (eps - eps_pred)^2 and ``vb`` is the variational bound term in
bits per dimension computed with the predicted eps detached, so ``vb`` only trains the variance
channels. At t=0 ``vb`` is the decoder NLL under a discretized Gaussian. Like improved-diffusion's
``RESCALED_MSE`` loss (DiT's setting) ``vb`` is multiplied by T/1000, which is exactly 1 for T=1000.

Sampling runs on a respaced process; the model always receives the ORIGINAL timestep indices
(``timestep_map``), as improved-diffusion's ``_WrappedModel`` does without timestep rescaling.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .dpm_solver import dpm_solver_sample, logsnr_timesteps
from .guidance import Model
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .objective import Objective
from .schedule import linear_betas
from .schedule import respace as respace_schedule

TABLES = ("alphas_cumprod", "alphas_cumprod_prev", "fixed_log_variance", "log_betas", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
          "timestep_map")  # the schedule tables a step reads, per timestep


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (keeps float64)."""
    return torch.promote_types(dtype, torch.float32)


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion(Objective):
    """Discrete-time DDPM objective and samplers: ancestral DDPM (default, 250 steps), DDIM (50) and
    DPM-Solver++ (20)."""

    samplers: ClassVar[dict[str, int]] = {"ddpm": 250, "ddim": 50, "dpm_solver++": 20}
    default_sampler: ClassVar[str] = "ddpm"

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        learn_sigma: bool = True,
    ):
        betas = linear_betas(num_timesteps, beta_start, beta_end)
        self._setup(betas, np.arange(num_timesteps, dtype=np.int64), learn_sigma)

    @classmethod
    def from_betas(
        cls, betas: np.ndarray, learn_sigma: bool = True, timestep_map: np.ndarray | None = None
    ) -> GaussianDiffusion:
        """A process with explicit betas; ``timestep_map[k]`` is the model timestep of step k."""
        diffusion = cls.__new__(cls)
        betas = np.asarray(betas, dtype=np.float64)
        if timestep_map is None:
            timestep_map = np.arange(len(betas), dtype=np.int64)
        diffusion._setup(betas, np.asarray(timestep_map, dtype=np.int64), learn_sigma)
        return diffusion

    def _setup(self, betas: np.ndarray, timestep_map: np.ndarray, learn_sigma: bool) -> None:
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"need a 1-D schedule with at least 2 steps, got shape {betas.shape}")
        if len(timestep_map) != len(betas):
            raise ValueError("timestep_map must have one entry per beta")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = timestep_map
        self.learn_sigma = learn_sigma
        self._respaced: dict[str, GaussianDiffusion] = {}
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}  # device -> every table, copied once

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        one_minus_ac = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ac
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_ac
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_ac
        self.log_betas = np.log(betas)
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))

    def _on_device(self, name: str, device: torch.device) -> Tensor:
        """The table ``name`` (e.g. "sqrt_alphas_cumprod") as a tensor on ``device``. The first call for a device
        copies every table at once (a host-to-device copy per call would wait for the device); being looked up
        by name, the tables enter a compiled ``loss_terms`` as graph inputs, so every objective in the process
        shares one graph (keyed by ``id`` of a table, each new objective recompiled it)."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = {table: torch.from_numpy(getattr(self, table)).to(device) for table in TABLES}
        return self._device_tables[device][name]

    def _gather(self, name: str, t: Tensor, ref: Tensor) -> Tensor:
        """Table ``name`` at ``t``, shaped (N, 1, ..., 1) for broadcasting against ``ref``, in ref's dtype."""
        picked = self._on_device(name, t.device)[t]  # (N,) float64
        return picked.to(ref.dtype).reshape(-1, *([1] * (ref.ndim - 1)))

    def respace(self, spec: str) -> GaussianDiffusion:
        """The process restricted to the steps kept by ``spec`` (cached), e.g. "250" or "ddim50"."""
        if spec not in self._respaced:
            kept, betas = respace_schedule(self.betas, spec)
            self._respaced[spec] = GaussianDiffusion.from_betas(betas, self.learn_sigma, self.timestep_map[kept])
        return self._respaced[spec]

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Map step indices of this (possibly respaced) process to the original int64 timesteps."""
        return self._on_device("timestep_map", t.device)[t]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); same dtype as x0."""
        if noise is None:
            noise = torch.randn_like(x0)
        work = _work_dtype(x0.dtype)
        x0w, noisew = x0.to(work), noise.to(work)
        signal = self._gather("sqrt_alphas_cumprod", t, x0w)
        noise_scale = self._gather("sqrt_one_minus_alphas_cumprod", t, x0w)
        x_t = signal * x0w + noise_scale * noisew
        return x_t.to(x0.dtype)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), in working precision."""
        work = _work_dtype(x_t.dtype)
        x0, x_t = x0.to(work), x_t.to(work)
        coef1, coef2 = self._gather("posterior_mean_coef1", t, x_t), self._gather("posterior_mean_coef2", t, x_t)
        mean = coef1 * x0 + coef2 * x_t
        variance = self._gather("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        recip = self._gather("sqrt_recip_alphas_cumprod", t, x_t)
        return recip * x_t - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Inverse of :meth:`predict_xstart_from_eps`."""
        recip = self._gather("sqrt_recip_alphas_cumprod", t, x_t)
        return (recip * x_t - x0) / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t)

    def split_output(self, model_out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Split (N, 2C, ...) into (eps, v) when sigma is learned, else return (eps, None)."""
        expected = 2 * channels if self.learn_sigma else channels
        if model_out.shape[1] != expected:
            raise ValueError(
                f"model returned {model_out.shape[1]} channels, expected {expected} "
                f"(learn_sigma={self.learn_sigma}, data channels={channels})"
            )
        if self.learn_sigma:
            return model_out[:, :channels], model_out[:, channels:]
        return model_out, None

    def p_mean_variance_from_output(
        self, model_out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Parameters of p(x_{t-1} | x_t) from a raw model output, in working precision.

        Returns 'mean', 'variance', 'log_variance', 'pred_xstart' and 'eps', each shaped like x_t.
        """
        work = _work_dtype(x_t.dtype)
        x_t = x_t.to(work)
        eps, v = self.split_output(model_out.to(work), x_t.shape[1])
        if v is None:
            log_variance = self._gather("fixed_log_variance", t, x_t).expand_as(x_t)
        else:
            min_log = self._gather("posterior_log_variance_clipped", t, x_t)
            max_log = self._gather("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self, model: Model, x_t: Tensor, t: Tensor, y: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Call ``model`` with the original timesteps and return :meth:`p_mean_variance_from_output`."""
        model_out = model(x_t, self.model_timesteps(t), y)
        return self.p_mean_variance_from_output(model_out, x_t, t, clip_denoised)

    def vb_terms_bpd(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretized-Gaussian decoder NLL of x_0 for t == 0. Returns (N,)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance_from_output(model_out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        x0w = x0.to(true_mean.dtype)
        nll = -discretized_gaussian_log_likelihood(x0w, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self, model: Model, x0: Tensor, y: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample 'loss' = 'mse' + 'vb', each (N,). ``t``/``noise`` default to draws from
        ``generator`` (torch's global RNG if None): randint then randn, on x0's device."""
        n = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (n,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)  # (N, C, H, W)
        model_out = model(x_t, self.model_timesteps(t), y)  # (N, 2C or C, H, W)
        return self.loss_terms(model_out, x0, x_t, noise, t)

    def loss_terms(self, model_out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> dict[str, Tensor]:
        """'loss', 'mse' and 'vb' (N,) of a model output at (x_t, t) for the data x0 noised with ``noise``:
        the loss arithmetic after the model call, without host work (``torch.compile`` takes it whole)."""
        work = _work_dtype(x0.dtype)
        eps, v = self.split_output(model_out.to(work), x0.shape[1])
        mse = _mean_flat((noise.to(work) - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def p_sample(self, model: Model, x: Tensor, t: Tensor, y: Tensor, clip_denoised: bool = False) -> Tensor:
        """One ancestral step x_t -> x_{t-1} (no noise added where t == 0); keeps x's dtype."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised)
        noise = torch.randn_like(out["mean"])
        nonzero = (t != 0).to(noise.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise).to(x.dtype)

    def ddim_step(
        self, model: Model, x: Tensor, t: Tensor, y: Tensor, eta: float = 0.0, clip_denoised: bool = False
    ) -> Tensor:
        """One DDIM step x_t -> x_{t-1}; draws noise only when ``eta > 0``; keeps x's dtype."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised)
        x_w, pred_xstart = x.to(out["mean"].dtype), out["pred_xstart"]
        eps = self.predict_eps_from_xstart(x_w, t, pred_xstart)
        abar = self._gather("alphas_cumprod", t, x_w)
        abar_prev = self._gather("alphas_cumprod_prev", t, x_w)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x_prev = pred_xstart * torch.sqrt(abar_prev) + torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0)) * eps
        if eta > 0:
            x_prev = x_prev + sigma * torch.randn_like(x_prev)
        return x_prev.to(x.dtype)

    def _run_sampler(
        self, net: Model, noise: Tensor, y: Tensor, sampler: str, steps: int, *, eta: float, clip_denoised: bool,
        progress: bool
    ) -> Tensor:
        """``"ddpm"`` (evenly strided), ``"ddim"`` (``ddimK`` striding, stochasticity ``eta``) or
        ``"dpm_solver++"`` (2nd-order multistep, uniform in log-SNR, deterministic)."""
        if sampler == "dpm_solver++":
            timesteps = logsnr_timesteps(self.alphas_cumprod, steps)
            return dpm_solver_sample(self, net, noise, y, timesteps, clip_denoised=clip_denoised, progress=progress)
        spaced = self.respace(str(steps) if sampler == "ddpm" else f"ddim{steps}")
        indices = range(spaced.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices, desc=f"{sampler} sampling")
        x = noise
        for i in indices:
            t = torch.full((noise.shape[0],), i, dtype=torch.long, device=noise.device)
            if sampler == "ddpm":
                x = spaced.p_sample(net, x, t, y, clip_denoised)
            else:
                x = spaced.ddim_step(net, x, t, y, eta, clip_denoised)
        return x

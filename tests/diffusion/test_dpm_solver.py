"""DPM-Solver++ multistep sampler: against diffusers, on Gaussian data with a known ODE solution, vs DDIM."""

import numpy as np
import pytest
import torch

from ditmoe.diffusion import GaussianDiffusion
from ditmoe.diffusion.dpm_solver import dpm_solver_sample, logsnr_timesteps
from ditmoe.diffusion.schedule import space_timesteps

F64 = torch.float64
ABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))  # float64 (1000,)
MU, S = 0.5, 0.5  # Gaussian data N(MU, S^2) per dimension


def _gaussian_eps(x, t):
    """Exact E[eps | x_t] for data N(MU, S^2): sqrt(1 - abar) (x - sqrt(abar) MU) / (abar S^2 + 1 - abar)."""
    abar = ABAR[t].reshape(-1, 1, 1, 1).to(x.dtype)
    return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)


def _nonlinear_model(x, t, y):
    """(N, 2C) learned-sigma output: a perturbed Gaussian eps depending on x, t and y, then variance values."""
    abar = ABAR[t].reshape(-1, 1, 1, 1).to(x.dtype)
    eps = _gaussian_eps(x, t) + 0.1 * (1 - abar) * torch.sin(3 * x + y.to(x.dtype).reshape(-1, 1, 1, 1))
    return torch.cat([eps, torch.tanh(x)], dim=1)


def _diffusers_sample(noise, y, timesteps):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, 2M midpoint) on the eps channels of the model."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", solver_order=2,
        algorithm_type="dpmsolver++", solver_type="midpoint", prediction_type="epsilon", final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    x = noise.clone()
    for t in scheduler.timesteps:
        eps = _nonlinear_model(x, t.repeat(len(x)), y)[:, : x.shape[1]]
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers under numpy 2
def test_matches_diffusers_dpmsolver_multistep():
    # diffusers' default "linspace" spacing would be 999, 949, ..., 50; we hand it our log-SNR timesteps.
    # Its final_sigmas_type="zero" is our final step to clean data, taken with order 1 as ours is.
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    timesteps = logsnr_timesteps(ABAR.numpy(), 20)
    ours = GaussianDiffusion().sample(_nonlinear_model, noise, y, num_classes=10, sampler="dpm_solver++", steps=20)
    assert ours.abs().max() > 0.5
    # diffusers steps in float32 with a float32 schedule; the measured difference is 1.1e-6.
    torch.testing.assert_close(_diffusers_sample(noise, y, timesteps), ours, rtol=0, atol=3e-6)


def _gaussian_model(seen):
    def model(x, t, y):
        seen.append(int(t[0]))
        eps = _gaussian_eps(x, t)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def _ode_error(sample):
    """Max |x_0 - exact PF-ODE solution| on N(MU, S^2) data; ``sample(model, noise) -> x_0``.

    The exact flow keeps z = (x_t - sqrt(abar) MU) / sqrt(abar S^2 + 1 - abar) fixed, so from x = noise at
    the first timestep the model sees it ends at x_0 = MU + S z.
    """
    noise = torch.randn(1000, 1, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sample(_gaussian_model(seen), noise)
    abar = ABAR[seen[0]]
    exact = MU + S * (noise - abar.sqrt() * MU) / (abar * S**2 + 1 - abar).sqrt()
    return (out - exact).abs().max().item()


def _sampled(sampler, steps):
    y = torch.zeros(1000, dtype=torch.long)
    return lambda model, noise: GaussianDiffusion().sample(model, noise, y, num_classes=10, sampler=sampler,
                                                           steps=steps)


def _solved(timesteps, order):
    y = torch.zeros(1000, dtype=torch.long)
    return lambda model, noise: dpm_solver_sample(GaussianDiffusion(), model, noise, y, timesteps, order=order)


def test_gaussian_data_second_order_accuracy():
    ddim20 = _ode_error(_sampled("ddim", 20))
    dpm = {steps: _ode_error(_sampled("dpm_solver++", steps)) for steps in (10, 20, 40)}
    assert 0.15 < ddim20 < 0.3
    assert dpm[20] < ddim20 / 8
    assert dpm[20] < dpm[10] / 2 and dpm[40] < dpm[20] / 3  # ~second order
    # On the same log-SNR timesteps, order 1 (= DDIM) is far worse.
    assert _ode_error(_solved(logsnr_timesteps(ABAR.numpy(), 20), order=1)) > 7 * dpm[20]
    # Uniform-in-t timesteps end with a large lambda jump where the 2nd-order update overshoots.
    uniform = np.array(space_timesteps(1000, "20")[::-1])
    assert _ode_error(_solved(uniform, order=2)) > ddim20


def _toy_model(x, t, y):
    """Deterministic (N, 2C) output depending on x, t and y."""
    scale = (t.to(x.dtype) / 1000.0 + 0.1 * y.to(x.dtype)).reshape(-1, 1, 1, 1)
    return torch.cat([0.3 * x + scale, torch.tanh(x)], dim=1)


@pytest.mark.parametrize("clip_denoised", [False, True])
def test_order1_equals_ddim_on_the_same_timesteps(clip_denoised):
    noise = torch.randn(2, 4, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    ddim = GaussianDiffusion().sample(_toy_model, noise, y, num_classes=10, sampler="ddim", steps=20,
                                      clip_denoised=clip_denoised)
    timesteps = np.array(space_timesteps(1000, "ddim20")[::-1])
    first = dpm_solver_sample(GaussianDiffusion(), _toy_model, noise, y, timesteps, order=1,
                              clip_denoised=clip_denoised)
    torch.testing.assert_close(first, ddim, rtol=0, atol=1e-12)


def test_cfg_doubles_the_batch_at_the_model_timesteps():
    calls = []

    def model(x, t, y):
        calls.append((len(x), t))
        return _toy_model(x, t, y)

    def guided(x, t, y):  # CFG at scale 3 applied by hand to the eps channels
        cond, uncond = _toy_model(x, t, y), _toy_model(x, t, torch.full_like(y, 10))
        return torch.cat([uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)

    noise = torch.randn(3, 4, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 5, 9])
    out = GaussianDiffusion().sample(model, noise, y, cfg_scale=3.0, num_classes=10, sampler="dpm_solver++")
    expected = GaussianDiffusion().sample(guided, noise, y, num_classes=10, sampler="dpm_solver++")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert [n for n, _ in calls] == [6] * 20
    assert all(t.dtype == torch.int64 and len(set(t.tolist())) == 1 for _, t in calls)
    assert [int(t[0]) for _, t in calls] == logsnr_timesteps(ABAR.numpy(), 20).tolist()


def test_logsnr_timesteps():
    abar = ABAR.numpy()
    lam = 0.5 * np.log(abar / (1 - abar))
    t20 = logsnr_timesteps(abar, 20)
    assert t20[0] == 999 and t20[-1] == 0 and (np.diff(t20) < 0).all()
    h = np.diff(lam[t20])  # (19,) ~ (lam[0] - lam[999]) / 19 = 0.51
    assert np.abs(h[:-3] - 0.51).max() < 0.03
    assert 0.35 < h[-3:].min() and h[-3:].max() < 0.6  # integer timesteps 10, 4, 1, 0 cannot be closer
    t1000 = logsnr_timesteps(abar, 1000)
    assert t1000.tolist() == list(range(999, -1, -1))


def test_bf16_keeps_dtype():
    noise = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    out = GaussianDiffusion().sample(_toy_model, noise, torch.tensor([1, 2]), num_classes=10, sampler="dpm_solver++")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_invalid_options_are_rejected():
    model, noise, y = _toy_model, torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="order=3.*valid choices: \\[1, 2\\]"):
        dpm_solver_sample(GaussianDiffusion(), model, noise, y, np.array([999, 0]), order=3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpm_solver_sample(GaussianDiffusion(), model, noise, y, np.array([0, 999]))
    with pytest.raises(ValueError, match="steps=1 for dpm_solver\\+\\+ must be between 2 and 1000"):
        GaussianDiffusion().sample(model, noise, y, num_classes=10, sampler="dpm_solver++", steps=1)
    with pytest.raises(ValueError, match="'dpm_solver\\+\\+'"):
        GaussianDiffusion().sample(model, noise, y, num_classes=10, sampler="dpm-solver")

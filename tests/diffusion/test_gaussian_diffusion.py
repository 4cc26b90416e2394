"""Forward process, posterior, VLB and training losses of GaussianDiffusion."""

import math

import numpy as np
import pytest
import torch

from ditmoe.diffusion import GaussianDiffusion
from ditmoe.diffusion.gaussian import TABLES
from ditmoe.diffusion.losses import discretized_gaussian_log_likelihood

F64 = torch.float64
BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHAS = 1.0 - BETAS
ABAR = np.cumprod(ALPHAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
POST_VAR = BETAS * (1 - ABAR_PREV) / (1 - ABAR)


def test_q_sample_moments():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion()
    steps = [0, 10, 500, 999]
    x0 = torch.full((4, 1, 200, 200), 0.7, dtype=F64)
    x_t = diffusion.q_sample(x0, torch.tensor(steps))
    for i, t in enumerate(steps):
        sample = x_t[i].flatten()
        assert abs(sample.mean().item() - math.sqrt(ABAR[t]) * 0.7) < 0.02
        assert sample.var().item() == pytest.approx(1 - ABAR[t], rel=0.03)


def test_q_sample_keeps_dtype():
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    assert GaussianDiffusion().q_sample(x0, torch.tensor([3, 900])).dtype == torch.bfloat16


def test_posterior_matches_closed_form():
    diffusion = GaussianDiffusion()
    steps = [1, 5, 200, 999]
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, dtype=F64, generator=gen)
    x_t = torch.randn(4, 2, 3, 3, dtype=F64, generator=gen)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, torch.tensor(steps))
    for i, t in enumerate(steps):
        c0 = math.sqrt(ABAR[t - 1]) * BETAS[t] / (1 - ABAR[t])
        ct = math.sqrt(ALPHAS[t]) * (1 - ABAR[t - 1]) / (1 - ABAR[t])
        expected_var = (1 - ABAR[t - 1]) / (1 - ABAR[t]) * BETAS[t]
        torch.testing.assert_close(mean[i], c0 * x0[i] + ct * x_t[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var[i], torch.full_like(x0[i], expected_var), rtol=1e-12, atol=0)
        torch.testing.assert_close(log_var[i], torch.full_like(x0[i], math.log(expected_var)), rtol=1e-12, atol=0)
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], x_t[:1], torch.tensor([0]))
    torch.testing.assert_close(mean0, x0[:1], rtol=1e-12, atol=1e-12)  # t=0: the posterior is x0 itself
    assert torch.all(var0 == 0)
    assert torch.allclose(log_var0, torch.tensor(math.log(POST_VAR[1]), dtype=F64))  # clipped


def _fixed_model(eps, v=None):
    """A 'model' that ignores its inputs and returns [eps, v]."""
    out = eps if v is None else torch.cat([eps, v], dim=1)
    return lambda x, t, y: out


def _case(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(steps)
    x0 = torch.randn(n, 3, 4, 4, dtype=F64, generator=gen)
    noise = torch.randn(n, 3, 4, 4, dtype=F64, generator=gen)
    return x0, noise, torch.tensor(steps), torch.zeros(n, dtype=torch.long)


def test_vb_zero_for_exact_posterior():
    diffusion = GaussianDiffusion()
    x0, noise, t, y = _case([1, 5, 500, 999])
    # The exact eps is the noise; v = -1 selects the posterior log-variance.
    out = diffusion.training_losses(_fixed_model(noise, -torch.ones_like(noise)), x0, y, t=t, noise=noise)
    assert torch.all(out["vb"].abs() < 1e-10)
    assert torch.all(out["mse"] < 1e-20)


def test_vb_with_wrong_variance_equals_closed_form_kl():
    diffusion = GaussianDiffusion()
    steps = [1, 5, 500]
    x0, noise, t, y = _case(steps)
    v = torch.full_like(noise, 0.4)  # frac = 0.7 of the way to log(beta)
    out = diffusion.training_losses(_fixed_model(noise, v), x0, y, t=t, noise=noise)
    for i, s in enumerate(steps):
        log_p = 0.7 * math.log(BETAS[s]) + 0.3 * math.log(POST_VAR[s])
        kl = 0.5 * (log_p - math.log(POST_VAR[s]) - 1 + POST_VAR[s] / math.exp(log_p))
        assert out["vb"][i].item() == pytest.approx(kl / math.log(2), rel=1e-7)
    assert out["vb"][0].item() > 1e-3  # beta_1 is about twice the posterior variance at t=1


def test_vb_with_wrong_mean_equals_closed_form_kl():
    diffusion = GaussianDiffusion()
    steps = [3, 700]
    x0, noise, t, y = _case(steps, seed=3)
    delta = 0.05
    out = diffusion.training_losses(_fixed_model(noise + delta, -torch.ones_like(noise)), x0, y, t=t, noise=noise)
    for i, s in enumerate(steps):
        coef1 = math.sqrt(ABAR_PREV[s]) * BETAS[s] / (1 - ABAR[s])
        mean_error = coef1 * math.sqrt(1 / ABAR[s] - 1) * delta
        kl = 0.5 * mean_error**2 / POST_VAR[s]
        assert out["vb"][i].item() == pytest.approx(kl / math.log(2), rel=1e-7)
        assert out["mse"][i].item() == pytest.approx(delta**2, rel=1e-9)


def test_vb_at_t0_is_decoder_nll():
    diffusion = GaussianDiffusion()
    grid = torch.linspace(-1, 1, 256, dtype=F64)
    x0 = grid[torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(4))]
    noise = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    t = torch.zeros(2, dtype=torch.long)
    out = diffusion.training_losses(_fixed_model(noise, -torch.ones_like(noise)), x0, t, t=t, noise=noise)
    log_scale = torch.full_like(x0, 0.5 * math.log(POST_VAR[1]))
    nll = -discretized_gaussian_log_likelihood(x0, x0, log_scale).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(out["vb"], nll, rtol=1e-9, atol=1e-12)
    assert torch.all(out["vb"] > 0.1)


def test_training_losses_shapes_and_sum():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion()
    seen = {}

    def model(x, t, y):
        seen["t"] = t
        return torch.cat([0.5 * x, torch.tanh(x)], dim=1)

    x0 = torch.randn(6, 4, 8, 8)
    out = diffusion.training_losses(model, x0, torch.arange(6))
    assert set(out) == {"loss", "mse", "vb"}
    for value in out.values():
        assert value.shape == (6,) and value.dtype == torch.float32
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    assert torch.all(out["vb"] > 0)
    assert seen["t"].dtype == torch.int64 and seen["t"].min() >= 0 and seen["t"].max() < 1000


def test_training_losses_use_global_rng():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(4, 4, 8, 8)
    model = _fixed_model(torch.zeros_like(x0), torch.zeros_like(x0))
    torch.manual_seed(7)
    first = diffusion.training_losses(model, x0, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(7)
    second = diffusion.training_losses(model, x0, torch.zeros(4, dtype=torch.long))
    third = diffusion.training_losses(model, x0, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(first["loss"], second["loss"], rtol=0, atol=0)
    assert not torch.equal(first["loss"], third["loss"])


def test_fixed_sigma_has_zero_vb():
    diffusion = GaussianDiffusion(learn_sigma=False)
    x0, noise, t, y = _case([2, 600])
    out = diffusion.training_losses(_fixed_model(torch.zeros_like(noise)), x0, y, t=t, noise=noise)
    assert torch.all(out["vb"] == 0)
    torch.testing.assert_close(out["loss"], out["mse"])
    torch.testing.assert_close(out["mse"], (noise**2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="channels"):
        diffusion.training_losses(_fixed_model(noise, noise), x0, y, t=t, noise=noise)


def test_vb_gradient_only_reaches_variance_channels():
    diffusion = GaussianDiffusion()
    x0, noise, t, y = _case([4, 300, 900])
    param = torch.randn(3, 6, 4, 4, dtype=F64, requires_grad=True)
    out = diffusion.training_losses(lambda x, t, y: param * 0.5, x0, y, t=t, noise=noise)
    (grad_vb,) = torch.autograd.grad(out["vb"].sum(), param, retain_graph=True)
    assert torch.all(grad_vb[:, :3] == 0)
    assert grad_vb[:, 3:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(out["mse"].sum(), param)
    assert torch.all(grad_mse[:, 3:] == 0)
    assert grad_mse[:, :3].abs().sum() > 0


def test_training_losses_bf16_inputs():
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    y = torch.zeros(2, dtype=torch.long)
    out = GaussianDiffusion().training_losses(lambda x, t, y: torch.cat([x, x], 1), x0, y)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"]).all()


def test_schedule_tables_are_copied_to_the_device_once():
    """A host-to-device copy of a schedule table per call would make every training step wait."""
    diffusion = GaussianDiffusion(num_timesteps=10)
    t = torch.tensor([0, 3, 9])
    first = diffusion._on_device("sqrt_alphas_cumprod", t.device)
    assert diffusion._on_device("sqrt_alphas_cumprod", t.device) is first
    tables = diffusion._device_tables[t.device]
    diffusion.q_sample(torch.zeros(3, 1, 2, 2), t)
    assert list(diffusion._device_tables) == [t.device] and diffusion._device_tables[t.device] is tables
    assert set(tables) == set(TABLES)  # every table copied at the first call, none later
    torch.testing.assert_close(diffusion._gather("sqrt_alphas_cumprod", t, torch.zeros(3, 1)),
                               torch.from_numpy(diffusion.sqrt_alphas_cumprod[[0, 3, 9]]).float()[:, None])

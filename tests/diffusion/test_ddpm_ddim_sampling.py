"""Respaced DDPM / DDIM samplers of GaussianDiffusion."""

import numpy as np
import pytest
import torch

from ditmoe.diffusion import GaussianDiffusion
from ditmoe.diffusion.schedule import space_timesteps

F64 = torch.float64
ABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))


def _toy_model(x, t, y):
    """Deterministic (N, 2C) output depending on x, t and y."""
    scale = (t.to(x.dtype) / 1000.0 + 0.1 * y.to(x.dtype)).reshape(-1, 1, 1, 1)
    return torch.cat([0.3 * x + scale, torch.tanh(x)], dim=1)


def _sample(sampler, noise, seed, **kwargs):
    torch.manual_seed(seed)
    return GaussianDiffusion().sample(
        _toy_model, noise, torch.tensor([1, 2]), num_classes=10, sampler=sampler, steps=20, **kwargs
    )


def test_ddim_eta0_is_deterministic_given_noise():
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    first, second = _sample("ddim", noise, 1), _sample("ddim", noise, 2)
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and not torch.allclose(first, noise)


def test_ddim_eta1_uses_global_rng():
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_sample("ddim", noise, 3, eta=1.0), _sample("ddim", noise, 3, eta=1.0))
    assert not torch.allclose(_sample("ddim", noise, 3, eta=1.0), _sample("ddim", noise, 4, eta=1.0))


@pytest.mark.slow
def test_ddpm_reproducible_with_seed_and_differs_across_seeds():
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_sample("ddpm", noise, 5), _sample("ddpm", noise, 5))
    assert not torch.allclose(_sample("ddpm", noise, 5), _sample("ddpm", noise, 6))


@pytest.mark.parametrize("sampler, spec", [("ddpm", "50"), ("ddim", "ddim50")])
def test_model_sees_original_timesteps(sampler, spec):
    seen = []

    def model(x, t, y):
        seen.append(t)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    GaussianDiffusion().sample(model, torch.randn(3, 2, 2, 2), torch.zeros(3, dtype=torch.long),
                               num_classes=10, sampler=sampler, steps=50)
    assert all(t.dtype == torch.int64 and t.shape == (3,) and len(set(t.tolist())) == 1 for t in seen)
    assert [int(t[0]) for t in seen] == space_timesteps(1000, spec)[::-1]


def _point_mass_model(x0, eps_seen):
    """Exact eps-predictor for data concentrated at x0 (uses ORIGINAL timesteps)."""

    def model(x, t, y):
        abar = ABAR[t].reshape(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        eps_seen.append(eps)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_perfect_predictor_recovers_point_mass(sampler):
    x0 = torch.randn(1, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)
    noise = torch.randn(1, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    eps_seen = []
    torch.manual_seed(0)
    out = GaussianDiffusion().sample(_point_mass_model(x0, eps_seen), noise, torch.zeros(1, dtype=torch.long),
                                     num_classes=10, sampler=sampler, steps=50)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    if sampler == "ddim":
        # Deterministic DDIM stays on the line sqrt(abar) x0 + sqrt(1 - abar) eps: eps never changes.
        for eps in eps_seen:
            torch.testing.assert_close(eps, eps_seen[0], rtol=0, atol=1e-9)


def _gaussian_data_model(mu, s, v):
    """Exact E[eps | x_t] for data x0 ~ N(mu, s^2), with a constant variance output v."""

    def model(x, t, y):
        abar = ABAR[t].reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def _sample_gaussian_data(sampler, steps, v, n=20000):
    torch.manual_seed(0)
    noise = torch.randn(n, 1, 1, 1, dtype=F64)
    return GaussianDiffusion().sample(_gaussian_data_model(0.5, 0.5, v), noise, torch.zeros(n, dtype=torch.long),
                                      num_classes=10, sampler=sampler, steps=steps).flatten()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.slow
def test_gaussian_data_distribution_is_recovered(sampler):
    out = _sample_gaussian_data(sampler, 250, v=0.0)
    assert abs(out.mean().item() - 0.5) < 0.02
    assert out.std().item() == pytest.approx(0.5, rel=0.04)


@pytest.mark.slow
def test_learned_variance_range_brackets_true_spread():
    # With few steps the posterior variance (v=-1) under-disperses and beta_t (v=+1) over-disperses.
    low = _sample_gaussian_data("ddpm", 50, v=-1.0).std().item()
    high = _sample_gaussian_data("ddpm", 50, v=1.0).std().item()
    assert low < 0.49 and 0.505 < high < 0.55


def test_bf16_sampling_keeps_dtype():
    noise = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    out = _sample("ddim", noise, 0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="euler"):
        GaussianDiffusion().sample(_toy_model, torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long),
                                   num_classes=10, sampler="euler")

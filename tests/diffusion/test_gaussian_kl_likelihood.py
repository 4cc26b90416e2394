"""Pure math helpers: Gaussian KL, approximate normal CDF, discretized log-likelihood."""

import math

import numpy as np
import torch

from ditmoe.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_identical_is_zero():
    mean = torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64)
    logvar = torch.tensor([-3.0, 0.0, 1.5], dtype=torch.float64)
    assert torch.allclose(normal_kl(mean, logvar, mean, logvar), torch.zeros(3, dtype=torch.float64), atol=1e-15)


def test_normal_kl_matches_numerical_integral():
    from scipy import integrate, stats

    m1, v1, m2, v2 = 1.0, 2.0, 0.5, 0.3
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -40, 40)
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, math.log(v1), m2, math.log(v2))))
    assert abs(got.item() - expected) < 1e-8
    assert expected > 0.5  # a non-trivial case


def test_approx_cdf_close_to_exact():
    from scipy import stats

    x = torch.linspace(-5, 5, 201, dtype=torch.float64)
    np.testing.assert_allclose(approx_standard_normal_cdf(x).numpy(), stats.norm.cdf(x.numpy()), atol=1e-3)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    from scipy import stats

    grid = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    for mean, scale in [(0.1, 0.3), (-0.8, 0.05), (0.0, 2.0)]:
        means = torch.full_like(grid, mean)
        log_scales = torch.full_like(grid, math.log(scale))
        probs = discretized_gaussian_log_likelihood(grid, means, log_scales).exp()
        assert abs(probs.sum().item() - 1.0) < 1e-9
        # Interior bins integrate the Gaussian over [x - 1/255, x + 1/255].
        exact = stats.norm.cdf((grid[100].item() + 1 / 255 - mean) / scale) - stats.norm.cdf(
            (grid[100].item() - 1 / 255 - mean) / scale
        )
        assert abs(probs[100].item() - exact) < 2e-3

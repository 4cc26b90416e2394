"""Gaussian KL and discretized Gaussian log-likelihood (elementwise, in nats)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_BIN_HALF_WIDTH = 1.0 / 255.0  # data in [-1, 1] quantised to 256 levels
_LOG_FLOOR = 1e-12


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, broadcasting all inputs."""
    return 0.5 * (
        logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Tanh approximation of the standard normal CDF (the one used by improved DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability of ``x`` (values on the 256-level grid of [-1, 1]) under a Gaussian
    integrated over each value's bin; the two outermost bins extend to -inf / +inf.

    ``log_scales`` is the log standard deviation. Returns a tensor shaped like ``x``.
    """
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _BIN_HALF_WIDTH))
    log_below_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))
    log_above_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))
    log_in_bin = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_in_bin))

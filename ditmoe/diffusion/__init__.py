"""Diffusion objectives for DiT-MoE: DDPM with learned variance and rectified flow.

Both implement :class:`Objective`: ``training_losses(model, x0, y)`` returning per-sample 'loss',
'mse' and 'vb', and ``sample(model, noise, y, *, cfg_scale, num_classes, ...)`` returning x_0.
"""

from __future__ import annotations

from typing import Any

from .gaussian import GaussianDiffusion
from .guidance import ClassifierFreeGuidance
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .objective import Objective
from .rectified_flow import RectifiedFlow
from .schedule import linear_betas, respace, space_timesteps

OBJECTIVES: dict[str, type[Objective]] = {"ddpm": GaussianDiffusion, "rectified_flow": RectifiedFlow}


def build_objective(name: str, **kwargs: Any) -> Objective:
    """Construct an objective by name ("ddpm" or "rectified_flow"), forwarding ``kwargs``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective name={name!r}; valid choices: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


__all__ = [
    "OBJECTIVES",
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "Objective",
    "RectifiedFlow",
    "approx_standard_normal_cdf",
    "build_objective",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "normal_kl",
    "respace",
    "space_timesteps",
]

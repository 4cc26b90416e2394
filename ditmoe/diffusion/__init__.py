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


def objective_for(name: str, model_config) -> Objective:
    """The objective ``name`` for a model of ``model_config``: DDPM learns σ only when the model predicts it."""
    return build_objective(name, learn_sigma=model_config.learn_sigma) if name == "ddpm" else build_objective(name)


__all__ = [
    "OBJECTIVES",
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "Objective",
    "RectifiedFlow",
    "approx_standard_normal_cdf",
    "build_objective",
    "objective_for",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "normal_kl",
    "respace",
    "space_timesteps",
]

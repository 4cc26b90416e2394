"""build_objective factory."""

import pytest

from ditmoe.diffusion import GaussianDiffusion, RectifiedFlow, build_objective


def test_builds_each_objective_with_kwargs():
    ddpm = build_objective("ddpm", learn_sigma=False, num_timesteps=100)
    assert isinstance(ddpm, GaussianDiffusion) and ddpm.num_timesteps == 100 and not ddpm.learn_sigma
    flow = build_objective("rectified_flow", time_scale=1000.0)
    assert isinstance(flow, RectifiedFlow) and flow.time_scale == 1000.0


def test_unknown_objective_names_option_and_choices():
    with pytest.raises(ValueError) as info:
        build_objective("flow_matching")
    message = str(info.value)
    assert "name" in message and "'flow_matching'" in message
    assert "ddpm" in message and "rectified_flow" in message

"""Both objectives implement the Objective protocol with one shared sample() signature."""

import inspect

import pytest
import torch

from ditmoe.diffusion import OBJECTIVES, Objective, RectifiedFlow, build_objective


def _parameters(method) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_satisfy_the_protocol(name):
    objective = build_objective(name)
    assert isinstance(objective, Objective)
    assert objective.default_sampler in objective.samplers


def test_sample_signatures_are_identical():
    gaussian, flow = (_parameters(cls.sample) for cls in OBJECTIVES.values())
    assert gaussian == flow == _parameters(Objective.sample)
    assert [name for name, *_ in gaussian[:4]] == ["self", "model", "noise", "y"]
    assert {"cfg_scale", "num_classes", "sampler", "steps", "guide_channels", "progress"} <= {p[0] for p in gaussian}


def test_default_sampler_per_objective():
    assert build_objective("ddpm").default_sampler == "ddpm"
    assert build_objective("rectified_flow").default_sampler == "euler"


def test_flow_rejects_clipping():
    with pytest.raises(ValueError, match="clip_denoised"):
        RectifiedFlow().sample(lambda x, t, y: x, torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long),
                               num_classes=10, clip_denoised=True)

"""Rectified flow objective and Euler sampler."""

import math

import pytest
import torch

from ditmoe.diffusion import RectifiedFlow

F64 = torch.float64


def test_interpolation_and_target():
    x0 = torch.tensor([[[[2.0]]], [[[-1.0]]]], dtype=F64)
    noise = torch.tensor([[[[0.5]]], [[[3.0]]]], dtype=F64)
    t = torch.tensor([0.25, 0.9], dtype=F64)
    x_t = RectifiedFlow.interpolate(x0, noise, t)
    expected = torch.tensor([0.75 * 2.0 + 0.25 * 0.5, 0.1 * -1.0 + 0.9 * 3.0], dtype=F64)
    torch.testing.assert_close(x_t.flatten(), expected)
    torch.testing.assert_close(RectifiedFlow.velocity_target(x0, noise).flatten(), torch.tensor([-1.5, 4.0], dtype=F64))


def test_logit_normal_times():
    torch.manual_seed(0)
    flow = RectifiedFlow(logit_mean=0.5, logit_std=1.0)
    t = flow.sample_t(100000)
    assert t.shape == (100000,) and t.dtype == torch.float32
    assert torch.all((t > 0) & (t < 1))
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)
    assert torch.logit(t.double()).std().item() == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("time_scale", [1.0, 1000.0])
def test_training_losses_values_and_model_time(time_scale):
    flow = RectifiedFlow(time_scale=time_scale)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.tensor([0.2, 0.7])
    seen = {}

    def model(x, tm, y):
        seen["x"], seen["t"] = x, tm
        return torch.cat([0.5 * x, torch.ones_like(x)], dim=1)  # learned-sigma head ignored

    out = flow.training_losses(model, x0, torch.zeros(2, dtype=torch.long), t=t, noise=noise)
    torch.testing.assert_close(seen["t"], t * time_scale)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["x"], x_t)
    expected = ((noise - x0 - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], expected)
    torch.testing.assert_close(out["loss"], expected)
    assert torch.equal(out["vb"], torch.zeros(2))


def test_training_losses_use_global_rng():
    flow = RectifiedFlow()
    x0 = torch.randn(4, 4, 4, 4)
    model = lambda x, t, y: x  # noqa: E731
    torch.manual_seed(3)
    a = flow.training_losses(model, x0, torch.zeros(4, dtype=torch.long))["loss"]
    torch.manual_seed(3)
    b = flow.training_losses(model, x0, torch.zeros(4, dtype=torch.long))["loss"]
    assert torch.equal(a, b) and a.shape == (4,)


def _point_mass_velocity(centers, null, time_scale=1.0):
    """Exact velocity for data at centers[y] (the null label's data sits at 0): v = (x - x0) / t."""

    def model(x, t, y):
        target = torch.where(y == null, torch.zeros_like(y, dtype=x.dtype), centers[y.clamp(max=len(centers) - 1)])
        v = (x - target.reshape(-1, 1, 1, 1)) / (t / time_scale).reshape(-1, 1, 1, 1)
        return torch.cat([v, torch.zeros_like(v)], dim=1)

    return model


def test_euler_recovers_point_mass():
    centers = torch.tensor([1.5, -0.7], dtype=F64)
    noise = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1])
    out = RectifiedFlow(time_scale=1000.0).sample(
        _point_mass_velocity(centers, null=2, time_scale=1000.0), noise, y, num_classes=2, steps=7
    )
    torch.testing.assert_close(out, centers[y].reshape(-1, 1, 1, 1).expand_as(out), rtol=0, atol=1e-10)


def test_euler_with_cfg_extrapolates_toward_condition():
    # uncond target 0, cond target c: the guided field is exactly the field of a point mass at s*c.
    centers = torch.tensor([1.5, -0.7], dtype=F64)
    noise = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 0])
    out = RectifiedFlow().sample(_point_mass_velocity(centers, null=2), noise, y, num_classes=2, cfg_scale=2.5)
    torch.testing.assert_close(out, 2.5 * centers[y].reshape(-1, 1, 1, 1).expand_as(out), rtol=0, atol=1e-10)


def test_bf16_euler_keeps_dtype():
    noise = torch.randn(2, 4, 2, 2).to(torch.bfloat16)
    out = RectifiedFlow().sample(lambda x, t, y: x, noise, torch.zeros(2, dtype=torch.long), num_classes=10)
    assert out.dtype == torch.bfloat16


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="ddpm"):
        RectifiedFlow().sample(lambda x, t, y: x, torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long),
                               num_classes=10, sampler="ddpm")

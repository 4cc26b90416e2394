"""Classifier-free guidance wrapper."""

import pytest
import torch

from ditmoe.diffusion import ClassifierFreeGuidance

NULL = 10


class ToyModel:
    """(N, 4, H, W) -> (N, 8, H, W); every channel depends on the label differently. Records batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append((x.shape[0], y.clone()))
        yy = y.to(x.dtype).reshape(-1, 1, 1, 1)
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1)
        channels = [x[:, c % 4 : c % 4 + 1] * (1 + yy * (c + 1)) + 0.001 * tt * c for c in range(8)]
        return torch.cat(channels, dim=1)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 2, 2, generator=gen), torch.tensor([5, 17, 900]), torch.tensor([0, 3, 7])


def test_scale_one_is_a_plain_conditional_call():
    model = ToyModel()
    x, t, y = _inputs()
    out = ClassifierFreeGuidance(model, 1.0, NULL)(x, t, y)
    assert torch.equal(out, ToyModel()(x, t, y))
    assert len(model.batches) == 1 and model.batches[0][0] == 3


@pytest.mark.parametrize("guide_channels, guided", [(None, 4), (3, 3)])
def test_guided_channels_and_conditional_rest(guide_channels, guided):
    model = ToyModel()
    x, t, y = _inputs()
    scale = 4.0
    out = ClassifierFreeGuidance(model, scale, NULL, guide_channels=guide_channels)(x, t, y)
    assert len(model.batches) == 1
    batch, labels = model.batches[0]
    assert batch == 6 and labels.tolist() == [0, 3, 7, NULL, NULL, NULL]
    cond = ToyModel()(x, t, y)
    uncond = ToyModel()(x, t, torch.full_like(y, NULL))
    expected = uncond + scale * (cond - uncond)
    torch.testing.assert_close(out[:, :guided], expected[:, :guided])
    torch.testing.assert_close(out[:, guided:], cond[:, guided:])
    assert not torch.allclose(out[:, guided:], expected[:, guided:])


def test_guide_channels_beyond_output_is_rejected():
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="guide_channels"):
        ClassifierFreeGuidance(ToyModel(), 2.0, NULL, guide_channels=9)(x, t, y)

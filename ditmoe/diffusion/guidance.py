"""Classifier-free guidance as a drop-in wrapper around ``model(x, t, y)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..model.conditioning import Caption, cat_conditions

Model = Callable[[Tensor, Tensor, Tensor], Tensor]  # model(x, t, y) -> output


class ClassifierFreeGuidance:
    """Callable ``(x, t, y) -> output`` that mixes conditional and unconditional predictions.

    Both predictions come from one doubled batch ``[x; x]`` with labels ``[y; null_label]``
    (the null label is ``num_classes``, the extra row of the label embedding); for a caption ``y``
    (text-conditioned models) with ``[y; y]`` and the second half dropped to the model's learned null
    caption (``model(x, t, y, drop)``). The first
    ``guide_channels`` output channels become ``uncond + scale * (cond - uncond)``; every other
    channel (e.g. the learned-sigma half) is taken from the conditional half.

    ``guide_channels=None`` guides all prediction channels, i.e. as many channels as ``x`` has.
    The official DiT sampler guides only the first 3 of the 4 latent channels; pass
    ``guide_channels=3`` to reproduce that. With ``scale == 1`` the wrapper is a single plain
    conditional call.
    """

    def __init__(self, model: Model, scale: float, null_label: int, guide_channels: int | None = None):
        if guide_channels is not None and guide_channels < 1:
            raise ValueError(f"guide_channels must be >= 1 or None, got {guide_channels}")
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.guide_channels = guide_channels

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.model(x, t, y)
        n = x.shape[0]
        if isinstance(y, Caption):
            drop = torch.arange(2 * n, device=x.device) >= n  # the second half gets the null caption
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), cat_conditions([y, y]), drop)
        else:
            null = torch.full_like(y, self.null_label)
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C_out, H, W)
        cond, uncond = out[:n], out[n:]
        g = x.shape[1] if self.guide_channels is None else self.guide_channels
        if g > out.shape[1]:
            raise ValueError(f"guide_channels={g} exceeds the model's {out.shape[1]} output channels")
        guided = uncond[:, :g] + self.scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)  # (N, C_out, H, W)


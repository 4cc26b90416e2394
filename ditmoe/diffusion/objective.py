"""The interface of a diffusion objective, with the one ``sample`` entry point every objective shares."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from .guidance import ClassifierFreeGuidance, Model


@runtime_checkable
class Objective(Protocol):
    """A training objective with its samplers.

    ``training_losses(model, x0, y, generator=g)`` returns per-sample (N,) 'loss', 'mse' and 'vb', drawing its
    timesteps and noise from ``g``; the arithmetic after its model call is ``loss_terms``. Objectives subclass
    this protocol and inherit :meth:`sample`; they name their samplers in ``samplers`` (name -> default
    number of steps) and ``default_sampler``, and run one in ``_run_sampler``.
    """

    samplers: ClassVar[dict[str, int]]
    default_sampler: ClassVar[str]

    def training_losses(
        self, model: Model, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]: ...

    def loss_terms(self, model_out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> dict[str, Tensor]:
        ...

    def _run_sampler(
        self, net: Model, noise: Tensor, y: Tensor, sampler: str, steps: int, *, eta: float, clip_denoised: bool,
        progress: bool
    ) -> Tensor:
        """x_0 from ``noise`` with ``sampler`` (a valid name) in ``steps`` steps of the guided model ``net``."""
        ...

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        noise: Tensor,
        y: Tensor,
        *,
        cfg_scale: float = 1.0,
        num_classes: int,
        guide_channels: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float = 0.0,
        progress: bool = False,
        clip_denoised: bool = False,
    ) -> Tensor:
        """Generate x_0 (N, C, H, W) from ``noise`` with labels ``y`` (N,); keeps noise's dtype.

        ``sampler`` defaults to ``default_sampler`` and ``steps`` to that sampler's entry in ``samplers``.
        Classifier-free guidance at ``cfg_scale`` uses ``num_classes`` as the null label and guides the
        first ``guide_channels`` output channels (all data channels when None). ``eta`` (DDIM noise) and
        ``clip_denoised`` apply to the samplers that support them.
        """
        sampler = self.default_sampler if sampler is None else sampler
        if sampler not in self.samplers:
            raise ValueError(
                f"sampler={sampler!r} is not supported by {type(self).__name__}; valid choices: {sorted(self.samplers)}"
            )
        steps = self.samplers[sampler] if steps is None else steps
        net = ClassifierFreeGuidance(model, cfg_scale, null_label=num_classes, guide_channels=guide_channels)
        return self._run_sampler(net, noise, y, sampler, steps, eta=eta, clip_denoised=clip_denoised, progress=progress)

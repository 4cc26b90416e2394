"""Generate latents from a model in batches, with classifier-free guidance and fixed seeds."""

from collections.abc import Iterable

import torch

from .model.conditioning import Condition, condition_to, index_condition
from .model.conditioning import batch_size as batch_size_of


@torch.no_grad()
def generate(model, objective, labels: Condition, *, cfg_scale: float = 1.0, sampler: str | None = None,
             steps: int | None = None, batch_size: int = 250, seed: int = 0, guide_channels: int | None = None,
             progress: bool = False, batches: Iterable[int] | None = None) -> torch.Tensor:
    """Latents (n, C, H, W) for ``labels`` (N,) or a Caption of N prompts, cut into batches of ``batch_size``:
    all of them, or only the batch indices ``batches``, concatenated in that order. Batch b holds
    ``labels[b * batch_size:][:batch_size]`` and starts from noise seeded by ``seed + b``, so it comes out
    the same whichever batches are generated."""
    cfg = model.config
    if guide_channels is not None and guide_channels > cfg.in_channels:
        raise ValueError(f"--guide-channels {guide_channels}: the model has {cfg.in_channels} channels")
    device = next(model.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    kwargs = {"cfg_scale": cfg_scale, "num_classes": cfg.num_classes, "guide_channels": guide_channels,
              "progress": progress, "steps": steps}
    if sampler is not None:
        kwargs["sampler"] = sampler
    if batches is None:
        batches = range(num_batches(batch_size_of(labels), batch_size))
    outputs = []
    for b in batches:
        y = index_condition(labels, slice(b * batch_size, (b + 1) * batch_size))
        torch.manual_seed(seed + b)
        noise = torch.randn((batch_size_of(y), *shape), device=device)
        outputs.append(objective.sample(model, noise, condition_to(y, device), **kwargs).cpu())
    return torch.cat(outputs)


def num_batches(num_samples: int, batch_size: int) -> int:
    """Batches of ``batch_size`` (the last one possibly shorter) that hold ``num_samples``."""
    return -(-num_samples // batch_size)


def rank_batches(total_batches: int, rank: int, world_size: int) -> range:
    """The contiguous batch indices rank ``rank`` of ``world_size`` generates: shares differ by at most one
    batch (the first ranks take the extra ones), and concatenated in rank order they are all batches in order."""
    share, extra = divmod(total_batches, world_size)
    start = rank * share + min(rank, extra)
    return range(start, start + share + (rank < extra))


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, C) uint8, the ADM npz layout."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ... : every class equally often (up to one)."""
    return torch.arange(num_samples) % num_classes

"""Generate latents from a model in batches, with classifier-free guidance and fixed seeds."""

import torch


@torch.no_grad()
def generate(model, objective, labels: torch.Tensor, *, cfg_scale: float = 1.0, sampler: str | None = None,
             steps: int | None = None, batch_size: int = 250, seed: int = 0, guide_channels: int | None = None,
             progress: bool = False) -> torch.Tensor:
    """Latents (N, C, H, W) for ``labels`` (N,). Batch b starts from noise seeded by ``seed + b``."""
    cfg = model.config
    device = next(model.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    kwargs = {"cfg_scale": cfg_scale, "num_classes": cfg.num_classes, "guide_channels": guide_channels,
              "progress": progress, "steps": steps}
    if sampler is not None:
        kwargs["sampler"] = sampler
    outputs = []
    for b, y in enumerate(labels.split(batch_size)):
        torch.manual_seed(seed + b)
        noise = torch.randn((len(y), *shape), device=device)
        outputs.append(objective.sample(model, noise, y.to(device), **kwargs).cpu())
    return torch.cat(outputs)


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, C) uint8, the ADM npz layout."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ... : every class equally often (up to one)."""
    return torch.arange(num_samples) % num_classes

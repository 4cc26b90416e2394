"""Load a diffusers ``AutoencoderKL`` and encode image batches and their horizontal flips."""

import torch


def load_vae(name_or_path, device, source="--vae"):
    """``AutoencoderKL`` from a hub id or a local directory, in eval mode on ``device``; an OSError naming
    ``source`` (where the name came from) and the name if it cannot be loaded."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)  # no accelerate needed
    except (OSError, ValueError) as e:
        raise OSError(f"{source} {name_or_path!r}: cannot load a diffusers AutoencoderKL: {e}") from None
    return vae.to(device).eval().requires_grad_(False)


def latent_shape(vae, resolution):
    """``(C, H, W)`` of the latents of a ``resolution`` x ``resolution`` image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE downsampling factor {factor}")
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


@torch.no_grad()
def encode_with_flip(vae, images):
    """uint8 ``(N, H, W, 3)`` -> float16 CPU ``(N, 2, 2, C, h, w)``.

    Axis 1 is the view (image, horizontal flip), axis 2 the posterior (mean, std). Pixels are
    scaled to [-1, 1] as in DiT (``ToTensor`` then ``Normalize(0.5, 0.5)``).
    """
    n = len(images)
    x = images.to(next(vae.parameters()).device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
    posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    stats = torch.stack([posterior.mean, posterior.std], dim=1)  # (2N, 2, C, h, w)
    return stats.unflatten(0, (2, n)).transpose(0, 1).to("cpu", torch.float16)

"""Synthetic image shards and a tiny random VAE, for tests and benchmarks (no downloads)."""

import io
import tarfile

import numpy as np
from PIL import Image

from .latent_format import write_latent_dataset


def natural_image(height, width, seed):
    """Photo-like uint8 ``(H, W, 3)``: smooth waves, flat discs with hard edges, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 128.0, dtype=np.float32)
    for c in range(3):
        for _ in range(4):
            fy, fx = rng.uniform(0.002, 0.05, 2)
            img[..., c] += rng.uniform(15, 40) * np.sin(fy * yy + fx * xx + rng.uniform(0, 6.3))
    for _ in range(6):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(4, max(5, min(height, width) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_image(array, fmt="JPEG", mode="RGB", quality=90):
    """uint8 ``(H, W, 3)`` -> encoded bytes in ``fmt`` after converting to ``mode``."""
    image = Image.fromarray(array).convert(mode)
    if mode == "RGBA":  # give the alpha channel some content
        image.putalpha(Image.fromarray(array[..., 0]))
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path, samples):
    """Write ``[(key, {ext: bytes})]`` as a WebDataset tar."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def save_tiny_vae(path, seed=0):
    """Save a randomly initialised ``AutoencoderKL`` (x8 downsampling, 4 latent channels) to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    )
    vae.save_pretrained(path)
    return path


# (height, width, format, mode): short sides above and below 2 x 256, odd sizes, an upscale,
# grayscale and CMYK JPEGs, RGBA and palette PNGs.
VARIED = [
    (375, 500, "JPEG", "RGB"), (600, 800, "JPEG", "RGB"), (515, 777, "JPEG", "RGB"), (1100, 1500, "JPEG", "RGB"),
    (520, 700, "JPEG", "L"), (640, 541, "JPEG", "CMYK"), (300, 280, "PNG", "RGBA"), (530, 530, "PNG", "P"),
    (200, 300, "JPEG", "RGB"),
]


def varied_samples(seed=0, bad=True, prefix="s"):
    """``[(key, {ext: bytes})]`` for :data:`VARIED` images with class labels; with ``bad``, also a
    truncated JPEG, a non-image ``.jpg`` and a sample without ``cls`` (keys starting ``bad``)."""
    samples = []
    for i, (h, w, fmt, mode) in enumerate(VARIED):
        ext = "jpg" if fmt == "JPEG" else "png"
        data = encode_image(natural_image(h, w, seed * 100 + i), fmt, mode)
        samples.append((f"{prefix}{seed:02d}-{i:02d}", {ext: data, "cls": str((seed + i) % 7).encode()}))
    if bad:
        jpeg = encode_image(natural_image(600, 600, seed))
        samples.insert(2, (f"bad-truncated-{prefix}{seed:02d}", {"jpg": jpeg[: len(jpeg) // 2], "cls": b"1"}))
        samples.insert(5, (f"bad-garbage-{prefix}{seed:02d}", {"jpg": b"\xff\xd8 not really a jpeg", "cls": b"2"}))
        samples.append((f"bad-nocls-{prefix}{seed:02d}", {"jpg": jpeg}))
    return samples


def write_random_latents(root, latent_shape, num_classes, n, seed=0):
    """``n`` standard-normal latents of ``latent_shape`` (C, H, W) with random labels, as latent shards in
    ``root`` (returned); the resolution recorded is that of an 8× VAE."""
    rng = np.random.default_rng(seed)
    write_latent_dataset(root, rng.standard_normal((n, *latent_shape), dtype=np.float32), 0.0,
                         rng.integers(0, num_classes, n), resolution=8 * latent_shape[-1], num_classes=num_classes)
    return root

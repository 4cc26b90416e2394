"""Training data: a directory of latent shards, or the embedded digits written in that format."""

from pathlib import Path

import torch.distributed as dist

from ..data import LatentLoader, write_latent_dataset
from ..data.digits import digits_arrays, pixels_to_latents
from ..data.latent_format import read_manifest
from ..model import DiTConfig
from .config import TrainConfig


def write_digits_shards(root: Path) -> Path:
    """The digits as 1-channel 8×8 "latents" of an identity autoencoder (std 0, scaling 1, no flip)."""
    if not (root / "manifest.json").is_file():
        images, labels = digits_arrays()
        write_latent_dataset(root, pixels_to_latents(images).numpy(), 0.0, labels, vae="identity",
                             resolution=8, samples_per_shard=512, num_classes=10)
    return root


def data_root(config: TrainConfig, rank: int) -> Path:
    """Directory of latent shards to train on; rank 0 writes the digits shards once, the others wait."""
    if config.data != "digits":
        return Path(config.data)
    root = Path(config.out) / "data" / "digits"
    if rank == 0:
        write_digits_shards(root)
    if dist.is_initialized():
        dist.barrier()
    return root


def build_loader(config: TrainConfig, model: DiTConfig, rank: int, world: int) -> LatentLoader:
    """Rank r of W gets entries r, r+W, ... of each global batch (see LatentLoader)."""
    if config.global_batch_size % world:
        raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by world_size={world}")
    root = data_root(config, rank)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"data={config.data!r}: expected 'digits' or a directory of latent shards "
                                f"with a manifest.json")
    manifest = read_manifest(root)
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(manifest["latent_shape"]) != expected:
        raise ValueError(f"data {config.data!r} has latents of shape {tuple(manifest['latent_shape'])}, "
                         f"the model expects {expected}")
    if manifest["num_classes"] > model.num_classes:
        raise ValueError(f"data {config.data!r} has {manifest['num_classes']} classes, "
                         f"the model only {model.num_classes}")
    return LatentLoader(root, config.global_batch_size // world, seed=config.seed, rank=rank, world_size=world,
                        num_workers=config.data_workers)

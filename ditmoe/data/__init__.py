"""Data pipeline: latent shard format, training loader, and latent precomputation."""

from .latent_format import CorruptShardError, ManifestError, write_latent_dataset
from .latent_loader import LatentLoader

__all__ = ["CorruptShardError", "LatentLoader", "ManifestError", "write_latent_dataset"]

"""Choose the training data source from the config and check it fits the model."""

import torch

from ..data.digits import digits_arrays, pixels_to_latents
from ..data.memory_loader import MemoryLoader
from ..model import DiTConfig
from .config import TrainConfig


def check_fits(model: DiTConfig, shape: tuple[int, ...], num_classes: int, source: str):
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(shape) != expected:
        raise ValueError(f"data {source!r} has latents of shape {tuple(shape)}, the model expects {expected}")
    if num_classes > model.num_classes:
        raise ValueError(f"data {source!r} has {num_classes} classes, the model only {model.num_classes}")


def build_loader(config: TrainConfig, model: DiTConfig):
    if config.data == "digits":
        images, labels = digits_arrays()
        latents = pixels_to_latents(images)
        check_fits(model, latents.shape[1:], int(labels.max()) + 1, config.data)
        return MemoryLoader(latents, torch.from_numpy(labels), config.global_batch_size, seed=config.seed)
    raise ValueError(f"data={config.data!r}: expected 'digits' or a directory of latent shards")

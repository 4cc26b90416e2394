"""Training data: a directory of latent shards, or the embedded digits written in that format (with captions
embedded by a tiny frozen text encoder for the text-to-image demo)."""

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


# The text encoder of the text-to-image digits: built by ditmoe, deterministic, every caption word one token.
DIGITS_TEXT_ENCODER = {"kind": "clip", "width": 16, "seed": 0, "max_length": 8}


def write_digits_caption_shards(root: Path, encoder_dir: Path) -> Path:
    """The digits with a caption per sample (``digit_captions.train_caption``), embedded by the tiny text
    encoder built in ``encoder_dir``."""
    if not (root / "manifest.json").is_file():
        from ..data.digit_captions import write_digits_caption_dataset
        from ..text import TextEncoder, build_tiny_text_encoder

        spec = DIGITS_TEXT_ENCODER
        build_tiny_text_encoder(encoder_dir, kind=spec["kind"], width=spec["width"], seed=spec["seed"])
        write_digits_caption_dataset(root, TextEncoder.load(encoder_dir, max_length=spec["max_length"]))
    return root


def data_root(config: TrainConfig, rank: int) -> Path:
    """Directory of latent shards to train on; rank 0 writes the embedded digits once, the others wait."""
    if config.data not in ("digits", "digits-t2i"):
        return Path(config.data)
    data = Path(config.out) / "data"
    root = data / config.data
    if rank == 0:
        if config.data == "digits":
            write_digits_shards(root)
        else:
            write_digits_caption_shards(root, (data / "text_encoder").resolve())
    if dist.is_initialized():
        dist.barrier()
    return root


def check_conditioning(data: str, manifest: dict, model: DiTConfig) -> None:
    """A text-conditioned model needs captions of its width and length; a class-conditional one, none."""
    has_captions = "text_dim" in manifest
    if model.is_text and not has_captions:
        raise ValueError(f"data {data!r} has no captions: a text-conditioned model (text_dim={model.text_dim}) needs "
                         f"a latent dataset precomputed with --text-encoder")
    if not model.is_text and has_captions:
        raise ValueError(f"data {data!r} holds captions: train a text-conditioned preset on it (model.text_dim > 0)")
    if has_captions and (manifest["text_dim"], manifest["text_max_length"]) != (model.text_dim, model.text_len):
        raise ValueError(f"data {data!r} has captions of {manifest['text_max_length']} tokens of width "
                         f"{manifest['text_dim']} ({manifest['text_encoder']}), the model expects {model.text_len} "
                         f"of width {model.text_dim}: set model.text_len and model.text_dim to match")


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
    check_conditioning(config.data, manifest, model)
    if not model.is_text and manifest["num_classes"] != model.num_classes:
        raise ValueError(f"data {config.data!r} has {manifest['num_classes']} classes, the model "
                         f"{model.num_classes}: pass --set model.num_classes={manifest['num_classes']}")
    return LatentLoader(root, config.global_batch_size // world, seed=config.seed, rank=rank, world_size=world,
                        num_workers=config.data_workers)

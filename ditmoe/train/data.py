"""Training data: a directory of latent shards, or the embedded digits written in that format (with captions
embedded by a tiny frozen text encoder for the text-to-image demo)."""

import functools
from pathlib import Path

import torch.distributed as dist

from ..data import LatentLoader, write_latent_dataset
from ..data.digits import digits_arrays, pixels_to_latents, split_indices
from ..data.latent_format import read_manifest
from ..data.latent_loader import read_fixed_samples
from ..model import DiTConfig
from .config import TrainConfig


def write_digits_shards(root: Path, split: str = "train") -> Path:
    """The digits of ``split`` as 1-channel 8×8 "latents" of an identity autoencoder (std 0, scaling 1, no flip)."""
    if not (root / "manifest.json").is_file():
        images, labels = digits_arrays()
        index = split_indices(split, len(labels))
        images, labels = images[index], labels[index]
        write_latent_dataset(root, pixels_to_latents(images).numpy(), 0.0, labels, vae="identity",
                             resolution=8, samples_per_shard=512, num_classes=10)
    return root


# The text encoders of the text-to-image digits (``digits_text_encoder``): a tiny random CLIP built by ditmoe,
# deterministic, every caption word one token; or the pretrained MiniLM, verified before loading.
DIGITS_TEXT_ENCODERS = {
    "tiny": {"kind": "clip", "width": 16, "seed": 0, "max_length": 8},
    "minilm": {"max_length": 10},  # "an image of the digit seven" is 8 tokens with [CLS] and [SEP]
}


def digits_text_encoder(choice: str, encoder_dir: Path):
    """The text encoder ``choice`` (a key of DIGITS_TEXT_ENCODERS); the tiny one is built in ``encoder_dir``."""
    from ..text import TextEncoder, build_tiny_text_encoder

    spec = DIGITS_TEXT_ENCODERS[choice]
    if choice != "tiny":
        return TextEncoder.load(choice, max_length=spec["max_length"])
    if not (encoder_dir / "config.json").is_file():
        build_tiny_text_encoder(encoder_dir, kind=spec["kind"], width=spec["width"], seed=spec["seed"])
    return TextEncoder.load(encoder_dir, max_length=spec["max_length"])


def write_digits_caption_shards(root: Path, encoder, split: str = "train") -> Path:
    """The digits of ``split`` with a caption per sample (``digit_captions.train_caption``) embedded by ``encoder``
    (a function returning the TextEncoder: built only when the shards are written)."""
    if not (root / "manifest.json").is_file():
        from ..data.digit_captions import write_digits_caption_dataset

        write_digits_caption_dataset(root, encoder(), split=split)
    return root


def data_root(config: TrainConfig, rank: int) -> Path:
    """Directory of latent shards to train on; rank 0 writes the embedded digits once, the others wait."""
    if config.data not in ("digits", "digits-t2i"):
        return Path(config.data)
    data = Path(config.out) / "data"
    root = data / config.data
    if rank == 0:
        encoder = functools.cache(lambda: digits_text_encoder(config.digits_text_encoder,
                                                              (data / "text_encoder").resolve()))
        for split, folder in (("train", root), ("val", data / f"{config.data}-val")):
            if config.data == "digits":
                write_digits_shards(folder, split)
            else:
                write_digits_caption_shards(folder, encoder, split)
    if dist.is_initialized():
        dist.barrier()
    return root


def validation_set(config: TrainConfig, model: DiTConfig):
    """Held-out ``(x, y, labels)`` for the validation loss: the embedded digits' validation split (written by
    ``data_root``) or ``val_data``; None when there is none or ``val_samples`` is 0."""
    if config.data in ("digits", "digits-t2i"):
        root = Path(config.out) / "data" / f"{config.data}-val"
    elif config.val_data:
        root = Path(config.val_data)
        check_dataset(root, f"val_data {config.val_data!r}", model)
    else:
        return None
    if not config.val_samples:
        return None
    return read_fixed_samples(root, config.val_samples, seed=config.seed)


def check_conditioning(what: str, manifest: dict, model: DiTConfig) -> None:
    """A text-conditioned model needs captions of its width and length; a class-conditional one, none."""
    has_captions = "text_dim" in manifest
    if model.is_text and not has_captions:
        raise ValueError(f"{what} has no captions: a text-conditioned model (text_dim={model.text_dim}) needs "
                         f"a latent dataset precomputed with --text-encoder")
    if not model.is_text and has_captions:
        raise ValueError(f"{what} holds captions: train a text-conditioned preset on it (model.text_dim > 0)")
    if has_captions and (manifest["text_dim"], manifest["text_max_length"]) != (model.text_dim, model.text_len):
        raise ValueError(f"{what} has captions of {manifest['text_max_length']} tokens of width "
                         f"{manifest['text_dim']} ({manifest['text_encoder']}), the model expects {model.text_len} "
                         f"of width {model.text_dim}: set model.text_len and model.text_dim to match")


def check_dataset(root: Path, what: str, model: DiTConfig) -> dict:
    """The manifest of latent dataset ``root`` (``what`` names it in errors), checked against the model."""
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{what}: expected 'digits' or a directory of latent shards with a manifest.json")
    manifest = read_manifest(root)
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(manifest["latent_shape"]) != expected:
        raise ValueError(f"{what} has latents of shape {tuple(manifest['latent_shape'])}, "
                         f"the model expects {expected}")
    check_conditioning(what, manifest, model)
    if not model.is_text and manifest["num_classes"] != model.num_classes:
        raise ValueError(f"{what} has {manifest['num_classes']} classes, the model "
                         f"{model.num_classes}: pass --set model.num_classes={manifest['num_classes']}")
    return manifest


def build_loader(config: TrainConfig, model: DiTConfig, rank: int, world: int) -> LatentLoader:
    """Rank r of W gets entries r, r+W, ... of each global batch (see LatentLoader)."""
    if config.global_batch_size % world:
        raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by world_size={world}")
    root = data_root(config, rank)
    check_dataset(root, f"data {config.data!r}", model)
    return LatentLoader(root, config.global_batch_size // world, seed=config.seed, rank=rank, world_size=world,
                        num_workers=config.data_workers)

"""Sample a checkpoint into an ADM-format npz on one process or many (an initialised process group).

The npz holds images: a model of VAE latents has its samples decoded by the VAE its data was encoded with (the
checkpoint's record, ``vae`` of its meta, or ``SampleSettings.vae``) before they are written, on each rank for
its own share; the models of the embedded digits (``vae`` "identity") sample their images directly.

Samples come in batches of ``batch_size``; batch b starts from noise seeded by ``seed + b``. Each rank
samples a contiguous share of the batches into ``<out>.rank<R>-of-<W>.npy``; rank 0 streams the parts into
the npz and removes them. The npz is the same for any number of ranks (same seed, batch size and kind of
device), written under a temporary name and renamed when complete, as is the grid. A run that dies part-way
may leave parts behind; the next run with as many ranks overwrites them. A failed write (a full disk) is one
error naming the file (``no space left on MOUNT writing PATH``) and leaves no partial file: a rank removes its
part, rank 0 the temporary npz and grid and every part; an earlier npz or grid of the same name stays as it was.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..diffusion import objective_for
from ..inference import load_model
from ..model.conditioning import Condition
from ..model.grouped_gemm import set_expert_gemm
from ..model.moe import set_capacity_threshold
from ..npz import NpzWriter, write_npy_header
from ..sampling import balanced_labels, generate, num_batches, rank_batches, to_uint8_images
from ..write_errors import remove, staged_file, writing
from .adm_evaluator import float32_matmuls
from .grid import save_grid
from .latent_quality import IDENTITY_VAE, decode_latents
from .prompts import load_text_encoder, prompt_captions, read_prompts, save_prompt_grid

COPY_ROWS = 256  # images per read while rank 0 copies the parts into the npz
DECODE_ROWS = 32  # latents per VAE decode


@dataclass(frozen=True)
class SampleSettings:
    """What to sample: ``num_samples`` images of classes cycling 0..K-1 (text models: of ``prompts`` and the
    lines of ``prompts_file``, cycling) from ``ckpt`` into ``out`` (.npz)."""

    ckpt: str
    out: str
    num_samples: int
    cfg_scale: float = 1.0
    sampler: str | None = None
    steps: int | None = None
    guide_channels: int | None = None
    weights: str = "ema"
    batch_size: int = 250
    grid: str | None = None
    seed: int = 0
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    text_encoder: str | None = None  # default: the one the checkpoint records
    text_max_length: int | None = None
    capacity_threshold: float | None = None  # models with a capacity predictor: its sampling-time threshold
    expert_gemm: str = "auto"  # the experts' grouped GEMMs: auto | torch | triton (ditmoe.model.grouped_gemm)
    vae: str | None = None  # decodes the latents: a VAE folder, hub id or "identity" (default: the recorded one)
    scaling_factor: float | None = None  # the latents' scale (default: the recorded one, else the VAE's own)


def load_in_turn(settings: SampleSettings, rank: int, device: torch.device):
    """(model on ``device``, meta). Rank 0 loads first, so a ZeRO-3 checkpoint's universal conversion
    (``weights="model"``) runs once; the other ranks load after it."""
    if rank > 0:
        dist.barrier()
    loaded = load_model(settings.ckpt, weights=settings.weights, device=device)
    if rank == 0:
        dist.barrier()
    return loaded


def recorded_vae(meta: dict) -> dict | None:
    """``{"name", "scaling_factor"}`` of the VAE the checkpoint's data was encoded with, if recorded (not in
    checkpoints written before the record, nor in exported folders that name none)."""
    recorded = meta.get("vae")
    return dict(recorded) if isinstance(recorded, dict) and recorded.get("name") else None


@dataclass(frozen=True)
class ImageDecoder:
    """Sampled latents ``(n, C, h, w)`` -> ``(n, H, W, C')`` uint8 images: ``vae.decode(latents / scaling_factor)``
    (C' = 3; ``DECODE_ROWS`` at a time on the VAE's device, float32 without TF32), or without a VAE the latents
    themselves (the embedded digits' pixels, C' = C)."""

    vae: object | None  # a diffusers AutoencoderKL, or None: the identity
    scaling_factor: float = 1.0

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        if self.vae is None:
            return to_uint8_images(latents / self.scaling_factor).numpy()
        with float32_matmuls():  # no TF32, as the training-time decoding (LatentQuality) and the evaluator
            return torch.cat([decode_latents(self.vae, chunk, self.scaling_factor)
                              for chunk in latents.split(DECODE_ROWS)]).numpy()


def image_decoder(meta: dict, in_channels: int, vae: str | None, scaling_factor: float | None,
                  device: torch.device) -> ImageDecoder:
    """The decoder of a model sampling ``in_channels`` channels: ``vae`` (``--vae``) or the one ``meta`` records;
    with neither, the identity for models of 1 or 3 channels (images) and a ValueError naming ``--vae`` for
    latent models. The scaling factor is ``scaling_factor``, else the recorded one when the recorded VAE is used,
    else the VAE's own ``config.scaling_factor`` (what tools/precompute_latents.py records)."""
    recorded = recorded_vae(meta) or {}
    name = vae or recorded.get("name")
    if not name:
        if in_channels not in (1, 3):
            raise ValueError(f"the checkpoint records no VAE and its model samples {in_channels}-channel latents, "
                             "not images: pass --vae PATH_OR_ID, the VAE its data was encoded with (and "
                             "--scaling-factor F if the data's differs from the VAE config's scaling_factor), or "
                             f"--vae {IDENTITY_VAE} to write the latents as they are")
        name = IDENTITY_VAE
    if scaling_factor is None and name == recorded.get("name"):
        scaling_factor = recorded.get("scaling_factor")
    if name == IDENTITY_VAE:
        return ImageDecoder(None, _scaling(scaling_factor or 1.0, name))
    from ..data.vae_encode import load_vae  # imports diffusers: only for latent models

    with torch.random.fork_rng(devices=[]):  # the weights are initialised randomly before they are loaded
        model = load_vae(name, device, source="--vae" if vae else "the checkpoint's vae (override it with --vae)")
    if model.config.latent_channels != in_channels:
        raise ValueError(f"vae {name!r} decodes {model.config.latent_channels}-channel latents, the model samples "
                         f"{in_channels} channels: pass the VAE its data was encoded with (--vae PATH_OR_ID)")
    return ImageDecoder(model, _scaling(scaling_factor or model.config.scaling_factor, name))


def _scaling(value, name: str) -> float:
    """``value``, a positive finite scaling factor (of the latents of vae ``name``), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"the scaling factor of vae {name!r} must be a positive number, got {value!r}")
    return float(value)


def part_path(out: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its images, next to ``out``."""
    return out.with_name(f"{out.name}.rank{rank:05d}-of-{world:05d}.npy")


def sample_batches(model, objective, labels: Condition, batches: range, settings: SampleSettings,
                   decode: ImageDecoder, progress: bool):
    """The uint8 images (n, H, W, C) of each of the global ``batches`` (latents turned into images by ``decode``),
    one batch at a time."""
    for b in batches:
        latents = generate(model, objective, labels, cfg_scale=settings.cfg_scale, sampler=settings.sampler,
                           steps=settings.steps, batch_size=settings.batch_size, seed=settings.seed,
                           guide_channels=settings.guide_channels, progress=progress, batches=[b])
        yield decode(latents)


def write_part(part: Path, images, count: int):
    """Stream ``count`` images, arriving in batches, into the .npy file ``part``. The file is created
    once the first batch is there, so a sampler that fails at once leaves no file behind; any later
    failure removes it."""
    first = next(images)
    with writing(part, part), open(part, "wb") as f:
        write_npy_header(f, (count, *first.shape[1:]), np.uint8)
        f.write(first.tobytes())
        for batch in images:
            f.write(batch.tobytes())


def part_rows(parts: list[np.ndarray]):
    """The rows of ``parts`` one after another, a few at a time."""
    for part in parts:
        for i in range(0, len(part), COPY_ROWS):
            yield part[i:i + COPY_ROWS]


def write_grid(path: str, parts: list[np.ndarray], labels: np.ndarray, num_classes: int):
    """One row per class of its first (up to 10) samples: the first samples, as labels cycle through the classes."""
    n = min(10, len(labels) // num_classes) * num_classes
    head = []
    for part in parts:
        head.append(part[:n - sum(map(len, head))])
    head = np.concatenate(head)
    rows = [head[labels[:len(head)] == c] for c in range(num_classes)]
    save_grid(np.concatenate(rows), rows=num_classes, path=path)


def assemble(out: Path, paths: list[Path], labels: np.ndarray, grid: str | None, num_classes: int,
             prompts: list[str] | None = None) -> tuple:
    """Rank 0, once every rank has written its part: the npz (and the grid) from the parts, which it then
    removes (also when writing fails: they are sampled again by the next run). Returns the shape of one image.
    ``labels``: classes, or with ``prompts`` each sample's prompt index (the npz then also holds ``prompts``)."""
    try:
        parts = [np.load(p, mmap_mode="r") for p in paths]
        with writing(out), NpzWriter(out) as npz:
            npz.add_chunks("arr_0", (len(labels), *parts[0].shape[1:]), np.uint8, part_rows(parts))
            npz.add("arr_1", labels.astype(np.int64))
            if prompts is not None:
                npz.add("prompts", np.array(prompts))
        if grid:
            with staged_file(grid) as staged:
                if prompts is not None:
                    save_prompt_grid(np.concatenate([np.asarray(p) for p in parts]), labels, prompts, staged)
                else:
                    write_grid(staged, parts, labels, num_classes)
        return parts[0].shape[1:]
    finally:
        remove(*paths)


def sample_to_npz(settings: SampleSettings, rank: int, world: int, device: torch.device) -> tuple | None:
    """Every rank samples its share; rank 0 writes ``settings.out`` (and the grid) and returns the shape of
    one image, the other ranks None."""
    out = Path(settings.out)
    total = num_batches(settings.num_samples, settings.batch_size)
    batches = rank_batches(total, rank, world)
    set_expert_gemm(settings.expert_gemm)
    model, meta = load_in_turn(settings, rank, device)
    if settings.capacity_threshold is not None:
        set_capacity_threshold(model, settings.capacity_threshold)
    objective = objective_for(meta["train_config"]["objective"], model.config)
    k = model.config.num_classes
    prompts = None
    if model.config.is_text:  # captions cycle through the prompts; labels hold each sample's prompt index
        prompts = read_prompts(settings.prompts, settings.prompts_file)
        encoder = load_text_encoder(meta, settings.text_encoder, settings.text_max_length, device)
        conditions, labels = prompt_captions(prompts, settings.num_samples, encoder)
    else:
        if settings.prompts or settings.prompts_file:
            raise ValueError(f"{settings.ckpt} is a class-conditional model: it takes no prompts")
        if settings.grid and settings.num_samples < k:
            raise ValueError(f"--grid needs at least {k} samples (one per class)")
        conditions = labels = balanced_labels(settings.num_samples, k)
    decode = image_decoder(meta, model.config.in_channels, settings.vae, settings.scaling_factor, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    if batches:  # with more ranks than batches, the last ones have none
        count = len(labels[batches.start * settings.batch_size:batches.stop * settings.batch_size])
        images = sample_batches(model, objective, conditions, batches, settings, decode, progress=rank == 0)
        write_part(part_path(out, rank, world), images, count)
    dist.barrier()
    if rank > 0:
        return None
    paths = [part_path(out, r, world) for r in range(world) if rank_batches(total, r, world)]
    return assemble(out, paths, labels.numpy(), settings.grid, k, prompts)

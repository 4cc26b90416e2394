"""Sample quality while training on a latent dataset: decode the model's latents with the dataset's VAE into
uint8 images, and score those images with ADM's metrics against a reference batch.

    quality = LatentQuality(manifest, "VIRTUAL_imagenet256_labeled.npz", device)  # once
    images = quality.decode(latents)      # (N, C, h, w) latents as the model samples them -> (N, H, W, 3) uint8
    metrics = quality.quality(images)     # {"fid": ..., "sfid": ..., "inception_score": ...}

The VAE is the one the manifest names (``vae``: a local ``AutoencoderKL`` folder or a hub id in the local
cache, loaded as the precompute tool loads it); the latents are divided by the manifest's ``scaling_factor``
before decoding. The digits datasets (``vae`` "identity") are their own images: 1 channel repeated to 3.

The metrics are those of ``adm_evaluator.evaluate_samples``, with the same FID Inception (weights from
``inception_weights`` or ``$DITMOE_INCEPTION_WEIGHTS``) and the same reference batches: the reference's
``mu, sigma, mu_s, sigma_s`` when it has them (else computed once from its ``arr_0``). Everything about the
reference is computed once, when the object is built: its statistics and the square roots of their
covariances, so that a call costs the Inception pass over the images plus well under a second
(``frechet.FrechetReference``). Precision and recall (``precision_recall=True``) need the reference's
``arr_0`` and one Inception pass over all of it at construction; they are off by default.

Building the object consumes no random numbers of the caller (the networks are built under a forked RNG),
and neither do ``decode`` and ``quality``; TF32 is off inside the Inception passes only, as in the evaluator.
"""

import math
import os
from contextlib import contextmanager

import numpy as np
import torch

from ..data.vae_encode import load_vae
from ..npz import check_npz, npz_keys
from ..sampling import to_uint8_images
from .adm_evaluator import (
    MIN_IMAGES,
    batch_outputs,
    check_images,
    float32_matmuls,
    image_shape,
    inception_outputs,
    rgb,
    statistics,
    stored_statistics,
)
from .adm_metrics import inception_score, precision_recall
from .frechet import FrechetReference
from .inception import WEIGHTS_ENV, load_inception

IDENTITY_VAE = "identity"  # the manifest's vae of datasets whose "latents" are the images (the digits)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """One batch of latents ``(n, C, h, w)`` scaled by ``scaling_factor`` -> ``(n, H, W, 3)`` uint8 images on the
    CPU: ``vae.decode(latents / scaling_factor)``, then [-1, 1] -> [0, 255] as ``sampling.to_uint8_images``."""
    weight = next(vae.parameters())
    pixels = vae.decode(latents.to(weight.device, weight.dtype) / scaling_factor).sample
    return to_uint8_images(pixels).cpu()


@contextmanager
def _exact(device: torch.device):
    """float32 throughout: no autocast of the caller's (a bf16 training step) and, as in the evaluator, no TF32."""
    with float32_matmuls(), torch.autocast(device.type, enabled=False):
        yield


class LatentQuality:
    """Decode latents of the dataset described by ``manifest`` and score the images against ``ref_npz``.

    ``manifest``: the dataset's manifest (``latent_format.read_manifest``; ``vae`` and ``scaling_factor`` are
    used). ``ref_npz``: an ADM reference batch, or None for decoding only (``quality`` then returns {}).
    ``inception_weights``: the FID Inception state dict (default ``$DITMOE_INCEPTION_WEIGHTS``), needed with
    ``ref_npz``. ``batch_size``: images per VAE decode and per Inception forward.
    """

    def __init__(self, manifest: dict, ref_npz: str | None, device, *, inception_weights: str | None = None,
                 batch_size: int = 32, precision_recall: bool = False):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vae_name, self.scaling_factor = _vae_of(manifest)
        self.ref_npz = None if ref_npz is None else str(ref_npz)
        self.with_precision_recall = bool(precision_recall)
        weights = stats = None
        if self.ref_npz is not None:  # every input checked before any network is loaded
            weights = inception_weights or os.environ.get(WEIGHTS_ENV)
            if not weights:
                raise ValueError(f"FID against {self.ref_npz} needs the FID Inception weights: pass inception_weights "
                                 f"or set ${WEIGHTS_ENV} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
            stats = _check_reference(self.ref_npz, self.with_precision_recall)
        with torch.random.fork_rng(devices=[]):  # weights are initialised randomly before they are loaded
            self.vae = None if self.vae_name == IDENTITY_VAE else load_vae(
                self.vae_name, self.device, source="the dataset's vae")
            self.inception = None if weights is None else load_inception(weights, self.device)
        self.fid_ref = self.sfid_ref = self.ref_pool = None
        if self.ref_npz is not None:
            self._load_reference(stats)

    def _load_reference(self, stats: dict | None) -> None:
        """The reference's FID and sFID Gaussians (and its pool features for precision/recall), computed once."""
        if stats is None or self.with_precision_recall:
            with _exact(self.device):
                outputs = inception_outputs(self.inception, self.ref_npz, self.batch_size, self.device)
            if self.with_precision_recall:
                self.ref_pool = outputs["pool"]
            if stats is None:
                stats = statistics(outputs)
        self.fid_ref = FrechetReference(stats["mu"], stats["sigma"])
        self.sfid_ref = FrechetReference(stats["mu_s"], stats["sigma_s"])

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """``(N, C, h, w)`` latents as the model produces them (scaled by the manifest's ``scaling_factor``, any
        device and float dtype) -> ``(N, H, W, 3)`` uint8 images, decoded ``batch_size`` at a time."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or len(latents) == 0:
            shape = tuple(latents.shape) if hasattr(latents, "shape") else type(latents).__name__
            raise ValueError(f"latents must be a (N >= 1, C, h, w) tensor, got {shape}")
        if self.vae is None and latents.shape[1] not in (1, 3):
            raise ValueError(f"latents of a dataset with vae {IDENTITY_VAE!r} are images of 1 or 3 channels, got "
                             f"{latents.shape[1]}")
        if self.vae is not None and latents.shape[1] != self.vae.config.latent_channels:
            raise ValueError(f"latents have {latents.shape[1]} channels, the dataset's vae {self.vae_name!r} takes "
                             f"{self.vae.config.latent_channels}")
        batches = []
        with _exact(self.device):
            for chunk in latents.detach().split(self.batch_size):
                if self.vae is None:
                    batches.append(rgb(to_uint8_images(chunk.float() / self.scaling_factor).cpu().numpy()))
                else:
                    batches.append(decode_latents(self.vae, chunk, self.scaling_factor).numpy())
        return np.concatenate(batches)

    def quality(self, images: np.ndarray) -> dict[str, float]:
        """{} without a reference batch; else FID, sFID and Inception Score (and precision, recall when asked
        for) of ``images`` (N >= 4, H, W, 3) uint8 (grayscale (N, H, W[, 1]) is repeated to 3 channels), as
        ADM's evaluator computes them."""
        if self.ref_npz is None:
            return {}
        images = np.asarray(images)
        check_images(images.shape, images.dtype, "LatentQuality.quality", "images")
        batches = (rgb(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size))
        with _exact(self.device):
            outputs = batch_outputs(self.inception, batches, self.device)
        metrics = {"fid": self.fid_ref.distance(outputs["pool"]),
                   "sfid": self.sfid_ref.distance(outputs["spatial"]),
                   "inception_score": inception_score(outputs["probs"])}
        if self.ref_pool is not None:
            metrics["precision"], metrics["recall"] = precision_recall(self.ref_pool, outputs["pool"],
                                                                       device=self.device)
        return metrics


def _vae_of(manifest: dict) -> tuple[str, float]:
    """(vae, scaling_factor) of a latent dataset's manifest, checked."""
    if not isinstance(manifest, dict) or "vae" not in manifest or "scaling_factor" not in manifest:
        keys = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"the manifest must name its vae and scaling_factor (latent_format.read_manifest), got {keys}")
    vae, scale = manifest["vae"], manifest["scaling_factor"]
    if not isinstance(vae, str) or not vae:
        raise ValueError(f"the manifest's vae must be a VAE folder, hub id or {IDENTITY_VAE!r}, got {vae!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the manifest's scaling_factor must be a positive number, got {scale!r}")
    return vae, float(scale)


def _check_reference(path: str, need_images: bool) -> dict | None:
    """The stored statistics (or None) of the reference batch at ``path``, after reading it through once: a
    missing file is a FileNotFoundError naming it, a damaged or unusable one a ValueError naming it."""
    check_npz(path)
    stats = stored_statistics(path)
    has_images = "arr_0" in npz_keys(path)
    if has_images:
        image_shape(path)  # uint8 images, at least MIN_IMAGES of them
    if stats is None and not has_images:
        raise ValueError(f"{path}: neither arr_0 nor mu, sigma, mu_s, sigma_s")
    if need_images and not has_images:
        raise ValueError(f"{path}: precision and recall need the reference images (arr_0, at least {MIN_IMAGES})")
    return stats

"""ADM's evaluation of samples (guided-diffusion evaluations/evaluator.py): Inception Score, FID, sFID,
precision and recall against a reference batch, and the writing of such reference batches.

``arr_0`` of an npz holds (N, H, W, 3) uint8 images; grayscale (N, H, W) or (N, H, W, 1) is repeated to 3
channels. Images are streamed (reference batches reach tens of GB).
"""

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..npz import NpzWriter, check_npz, npz_keys, open_array
from .adm_metrics import inception_score, precision_recall
from .frechet import feature_statistics, frechet_distance
from .inception import InceptionV3, load_inception

MIN_IMAGES = 4  # precision/recall use the 3rd nearest neighbour
STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


def check_images(shape: tuple, dtype, where: str, name: str = "arr_0") -> None:
    """ValueError (``where: ...``) unless ``shape`` and ``dtype`` (of the array ``name``) are those of at least
    MIN_IMAGES uint8 images (N, H, W, 3) or grayscale (N, H, W[, 1])."""
    if dtype != np.uint8:
        raise ValueError(f"{where}: {name} must hold uint8 images, got {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))) or 0 in shape[1:]:
        raise ValueError(f"{where}: {name} must be (N, H, W, 3) images or grayscale (N, H, W[, 1]), "
                         f"got shape {shape}")
    if shape[0] < MIN_IMAGES:
        raise ValueError(f"{where}: the metrics need at least {MIN_IMAGES} images (k=3 nearest neighbours), "
                         f"got {shape[0]}")


def rgb(batch: np.ndarray) -> np.ndarray:
    """(n, H, W[, 1 or 3]) uint8 images -> (n, H, W, 3): grayscale repeated to 3 channels."""
    batch = batch.reshape(*batch.shape[:3], -1)
    return np.repeat(batch, 3, axis=3) if batch.shape[3] == 1 else batch


@contextmanager
def _open_images(path: str):
    """arr_0 of the npz at ``path`` as an ``ArrayStream``, after checking it holds enough uint8 images."""
    with open_array(path, "arr_0") as images:
        check_images(images.shape, images.dtype, path)
        images.check_c_order()
        yield images


def image_shape(path: str) -> tuple[int, ...]:
    """Shape of arr_0 after checking it holds enough uint8 images."""
    with _open_images(path) as images:
        return images.shape


def image_batches(path: str, batch_size: int):
    """Yield (n, H, W, 3) uint8 batches of arr_0, streamed."""
    with _open_images(path) as images:
        for batch in images.batches(batch_size):
            yield rgb(batch)


@torch.no_grad()
def batch_outputs(model: InceptionV3, batches, device) -> dict[str, np.ndarray]:
    """pool (N, 2048), spatial (N, 2023) and probs (N, 1008) of the images of ``batches``, (n, H, W, 3) uint8 each."""
    parts = {"pool": [], "spatial": [], "probs": []}
    for batch in batches:
        out = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2))
        for name, chunks in parts.items():
            chunks.append(getattr(out, name).cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def inception_outputs(model: InceptionV3, path: str, batch_size: int, device) -> dict[str, np.ndarray]:
    """pool (N, 2048), spatial (N, 2023) and probs (N, 1008) of every image in arr_0."""
    return batch_outputs(model, image_batches(path, batch_size), device)


def statistics(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ADM's reference statistics: mean and covariance of the pool (mu, sigma) and spatial (mu_s, sigma_s) features."""
    (mu, sigma), (mu_s, sigma_s) = feature_statistics(outputs["pool"]), feature_statistics(outputs["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def stored_statistics(path: str) -> dict[str, np.ndarray] | None:
    """mu, sigma, mu_s, sigma_s of a reference batch, or None when it has none."""
    keys = npz_keys(path)
    present = [k for k in STAT_SHAPES if k in keys]
    if not present:
        return None
    missing = [k for k in STAT_SHAPES if k not in present]
    if missing:
        raise ValueError(f"{path}: has {', '.join(present)} but not {', '.join(missing)}")
    with np.load(path) as ref:
        stats = {k: ref[k] for k in STAT_SHAPES}
    for key, shape in STAT_SHAPES.items():
        if stats[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {stats[key].shape}, expected {shape}")
        if stats[key].dtype.kind not in "fiu":
            raise ValueError(f"{path}: {key} must hold real numbers, got {stats[key].dtype}")
        if not np.isfinite(stats[key]).all():
            raise ValueError(f"{path}: {key} holds NaN or infinite values")
    return stats


@contextmanager
def float32_matmuls():
    """The TF graph runs in float32; TF32 moves features by ~1e-3. TF32 is off inside the block, and the
    settings are restored after it (a training run keeps its own)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@float32_matmuls()
def write_reference_batch(samples: str, out: str, weights: str, batch_size: int = 64, device="cpu") -> None:
    """An np.savez-compatible reference batch at ``out`` for the images of ``samples``: their statistics
    and the 3-channel arr_0, written batch by batch."""
    check_npz(samples)  # a damaged file fails here, not after the Inception pass
    count, height, width = image_shape(samples)[:3]
    model = load_inception(weights, device)
    stats = statistics(inception_outputs(model, samples, batch_size, device))
    with NpzWriter(out) as npz:
        for key, value in stats.items():
            npz.add(key, value)
        npz.add_chunks("arr_0", (count, height, width, 3), np.uint8, image_batches(samples, batch_size))


@float32_matmuls()
def evaluate_samples(samples: str, ref: str, weights: str, batch_size: int = 64, device="cpu") -> dict:
    """The five metrics of ADM's evaluator for ``samples`` against the reference batch ``ref`` (None where
    not computable: precision and recall need the reference's arr_0). Inputs are checked before any work."""
    check_npz(samples)  # damaged files fail here, not after the Inception passes
    check_npz(ref)
    image_shape(samples)
    ref_stats = stored_statistics(ref)
    ref_has_images = "arr_0" in npz_keys(ref)
    if ref_has_images:
        image_shape(ref)
    elif ref_stats is None:
        raise ValueError(f"{ref}: neither arr_0 nor mu, sigma, mu_s, sigma_s")
    model = load_inception(weights, device)
    _log(f"computing activations of {samples}...")
    sample_outputs = inception_outputs(model, samples, batch_size, device)
    ref_outputs = None
    if ref_has_images:
        _log(f"computing activations of {ref}...")
        ref_outputs = inception_outputs(model, ref, batch_size, device)
    ref_stats = ref_stats if ref_stats is not None else statistics(ref_outputs)
    sample_stats = statistics(sample_outputs)
    _log("computing metrics...")
    metrics = {
        "inception_score": inception_score(sample_outputs["probs"]),
        "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"],
                                 ref_stats["mu_s"], ref_stats["sigma_s"]),
        "precision": None,
        "recall": None,
    }
    if ref_outputs is None:
        _log(f"precision/recall skipped: {ref} has no arr_0 images")
    else:
        metrics["precision"], metrics["recall"] = precision_recall(ref_outputs["pool"], sample_outputs["pool"],
                                                                   device=device)
    return metrics


def write_metrics(path: str, metrics: dict, samples: str, ref: str) -> None:
    """``metrics`` of ``samples`` against ``ref`` as a JSON file (its folder created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**metrics, "samples": samples, "ref": ref}, indent=2) + "\n")

"""The embedded default dataset: scikit-learn's 8×8 handwritten digits as 1-channel "latents"."""

import numpy as np
import torch

PIXEL_MAX = 16.0  # digits pixels are integers in [0, 16]
HELD_OUT_EVERY = 10  #: Digit i is held out of training (the validation split) when i % HELD_OUT_EVERY == 9.
SPLITS = ("train", "val", "all")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 8, 8) uint8 in [0, 16] and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.uint8), data.target.astype(np.int64)


def split_indices(split: str, total: int) -> np.ndarray:
    """Indices of the digits in ``split``: 'val' every tenth digit (179 of 1797), 'train' the others, or 'all'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    index = np.arange(total)
    held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return index if split == "all" else index[held_out if split == "val" else ~held_out]


def pixels_to_latents(images: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) pixels in [0, 16] -> (N, 1, 8, 8) float32 in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / PIXEL_MAX * 2 - 1).unsqueeze(1)


def latents_to_pixels(latents: torch.Tensor) -> np.ndarray:
    """(N, 1, 8, 8) model outputs -> (N, 8, 8) float pixels clipped to [0, 16]."""
    return ((latents[:, 0].float().clamp(-1, 1) + 1) / 2 * PIXEL_MAX).cpu().numpy()


def pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(N, 8, 8) float pixels in [0, 16] -> uint8 in [0, 255], for image files."""
    return np.round(pixels / PIXEL_MAX * 255).astype(np.uint8)

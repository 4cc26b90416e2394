"""Noise schedules: the linear beta schedule and timestep respacing.

Respacing follows the ``space_timesteps`` convention of improved-diffusion:
a spec such as ``"250"`` keeps 250 evenly strided steps of the original process,
``"10,20"`` splits the process into equal sections with 10 and 20 steps each, and
``"ddim50"`` keeps ``range(0, T, stride)`` for the integer stride giving exactly 50 steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas spaced linearly from ``beta_start`` to ``beta_end`` (inclusive), float64, shape (T,).

    The endpoints are used as given (improved-diffusion rescales them by 1000/T; here the
    caller chooses them explicitly, which coincides for the default T=1000).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _ddim_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``range(0, T, stride)`` for the smallest integer stride that yields exactly ``count`` steps."""
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"timestep spec 'ddim{count}': no integer stride gives exactly {count} of {num_timesteps} steps")


def _section_timesteps(num_timesteps: int, counts: Sequence[int]) -> list[int]:
    """Split [0, T) into ``len(counts)`` near-equal sections and stride each evenly (ends included)."""
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"timestep spec: cannot take {count} steps from a section of {size} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0  # accumulated (not k * stride) so rounding matches improved-diffusion
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


def space_timesteps(num_timesteps: int, spec: str | Sequence[int]) -> list[int]:
    """Sorted original timestep indices kept by a respacing ``spec`` (see module docstring)."""
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, int(spec[len("ddim"):]))
        spec = [int(part) for part in spec.split(",")]
    return sorted(set(_section_timesteps(num_timesteps, list(spec))))


def respace(betas: np.ndarray, spec: str | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Respace a schedule: returns (kept timesteps int64 (K,), new betas float64 (K,)).

    The new betas are chosen so that the respaced cumulative products of alphas equal
    the original ones at the kept steps: beta'_k = 1 - abar[t_k] / abar[t_{k-1}].
    """
    betas = np.asarray(betas, dtype=np.float64)
    kept = np.asarray(space_timesteps(len(betas), spec), dtype=np.int64)
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]  # (K,)
    previous = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return kept, 1.0 - alphas_cumprod / previous

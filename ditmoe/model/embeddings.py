"""Input embeddings of DiT: patches, fixed 2-D sin-cos positions, timesteps and class labels."""

import math

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches of a (N, C, H, W) latent, linearly projected to D."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding: sines then cosines of geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size², dim) fixed positional table, tokens in row-major order.

    The first half of the channels encodes the column, the second half the row (DiT/MAE's layout).
    """
    if dim % 4:
        raise ValueError(f"hidden_size={dim} must be divisible by 4 for 2-D sin-cos positions")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # (T,)
    cols = coords.repeat(grid_size)  # (T,)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> 256-d sinusoidal features -> MLP -> (N, D)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, dim/2)
        return torch.cat([args.cos(), args.sin()], dim=-1)  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); index ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels: (N,). ``drop`` (N,) bool: labels replaced by the null class; in training without it, each
        is dropped with probability ``dropout_prob`` by torch's global RNG."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (N, D)

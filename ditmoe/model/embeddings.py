"""Input embeddings of DiT: patches, fixed 2-D sin-cos positions, timesteps, class labels and captions."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Caption


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


def pad_caption(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption tokens (N, L, C) and mask (N, L) padded at the end to ``length`` >= L (zeros, mask False)."""
    extra = length - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of x (N, L, D) where mask (N, L) is True -> (N, D) (0 for a caption without tokens)."""
    weights = mask.to(x.dtype)[..., None]  # (N, L, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


class CaptionEmbedder(nn.Module):
    """Caption tokens of a frozen text encoder -> (N, L, D) context for cross-attention, its (N, L) mask, and
    with ``pooled`` an (N, D) term for the adaLN input.

    ``y_proj``: Linear(C, D) -> GELU(tanh) -> Linear(D, D) per token (PixArt-α's caption projection).
    ``null_caption`` (text_len, C): the learned caption of classifier-free guidance, present when
    ``dropout_prob > 0``; a dropped sample's tokens become it and its mask all True (over text_len tokens).
    ``pool``: Linear -> SiLU -> Linear of the masked mean of the projected tokens.
    """

    def __init__(self, text_dim: int, text_len: int, hidden_size: int, dropout_prob: float, pooled: bool = False):
        super().__init__()
        self.text_dim, self.text_len, self.dropout_prob = text_dim, text_len, dropout_prob
        self.y_proj = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.null_caption = nn.Parameter(torch.empty(text_len, text_dim)) if dropout_prob > 0 else None
        self.pool = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        ) if pooled else None
        self.reset_null_caption()

    def reset_null_caption(self):
        """N(0, 1/text_dim): the scale of unit-variance text-encoder features per token."""
        if self.null_caption is not None:
            nn.init.normal_(self.null_caption, std=self.text_dim**-0.5)

    def drop(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples where ``drop`` (N,) is True get the null caption (padded like tokens (N, L, C), L >= text_len)."""
        if self.null_caption is None:
            raise ValueError("captions cannot be dropped: the model has no null caption (class_dropout_prob=0)")
        null = self.null_caption.to(tokens.dtype)[None]  # (1, text_len, C)
        null_mask = torch.ones(1, self.text_len, dtype=torch.bool, device=mask.device)
        null, null_mask = pad_caption(null, null_mask, tokens.shape[1])  # (1, L, C), (1, L)
        tokens = torch.where(drop[:, None, None], null, tokens)
        return tokens, torch.where(drop[:, None], null_mask, mask)

    def forward(self, caption: Caption, drop: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """caption: tokens (N, L, C), mask (N, L) bool. ``drop`` (N,) bool replaces captions by the null caption;
        in training without it, each is dropped with probability ``dropout_prob`` (torch's global RNG).

        Captions shorter than text_len are padded to it. Returns context (N, max(L, text_len), D), its mask,
        and the pooled (N, D) term (None without ``pooled``).
        """
        tokens, mask = caption.tokens.to(self.y_proj[0].weight.dtype), caption.mask.bool()
        tokens, mask = pad_caption(tokens, mask, max(tokens.shape[1], self.text_len))
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(tokens.shape[0], device=tokens.device) < self.dropout_prob
        if drop is not None:
            tokens, mask = self.drop(tokens, mask, drop.to(device=tokens.device, dtype=torch.bool))
        context = self.y_proj(tokens)  # (N, L, D)
        pooled = self.pool(masked_mean(context, mask)) if self.pool is not None else None
        return context, mask, pooled

"""Self-attention and cross-attention, multi-head or grouped-query, with optional per-head q/k LayerNorm.

Parameter layout. Self-attention with as many key/value heads as query heads keeps DiT's fused
``qkv = Linear(D, 3D)`` (rows [q | k | v], each head-major), so existing checkpoints and weight adapters
load unchanged. With fewer key/value heads (grouped-query attention) the projections are split:
``q = Linear(D, D)`` and ``kv = Linear(D, 2·H_kv·hd)`` (rows [k | v], each head-major). Cross-attention
always has ``q`` (from the image tokens) and ``kv`` (from the caption tokens). ``proj`` is the output
projection everywhere.

Grouped-query attention: query head h reads key/value head ``h // (H / H_kv)`` (the grouping of SDPA's
``enable_gqa``). The key/value heads are expanded to H before SDPA rather than passing ``enable_gqa``,
which only some SDPA backends accept (not the memory-efficient kernel a masked cross-attention needs);
the projections still have the GQA sizes, only the attention inputs are expanded.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .gpu_contracts import check_attention, checks_enabled


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, H_kv, S, hd) -> (N, H, S, hd): each key/value head repeated for its H/H_kv query heads."""
    n, kv_heads, s, hd = x.shape
    if kv_heads == num_heads:
        return x
    return x[:, :, None].expand(n, kv_heads, num_heads // kv_heads, s, hd).reshape(n, num_heads, s, hd)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, S, heads·hd) -> (N, heads, S, hd)."""
    n, s, _ = x.shape
    return x.reshape(n, s, num_heads, -1).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA of q (N, H, T, hd) over k, v (N, H_kv, S, hd); ``mask`` broadcastable to (N, H, T, S), True = attend.
    Returns (N, T, H·hd)."""
    heads = q.shape[1]
    out = F.scaled_dot_product_attention(q, expand_kv_heads(k, heads), expand_kv_heads(v, heads), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)  # (N, T, H*hd)


class Attention(nn.Module):
    """Self-attention over the image tokens: multi-head (fused ``qkv``) or grouped-query (``q`` and ``kv``).

    ``fused_qkv`` (default: when num_kv_heads equals num_heads) picks the layout; the split layout with
    num_kv_heads == num_heads computes the same function as the fused one.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False, num_kv_heads: int = 0,
                 fused_qkv: bool | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = hidden_size // num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        if fused_qkv is None:
            fused_qkv = self.num_kv_heads == num_heads
        if fused_qkv and self.num_kv_heads != num_heads:
            raise ValueError(f"fused qkv needs num_kv_heads={self.num_kv_heads} == num_heads={num_heads}")
        if fused_qkv:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        else:
            self.q = nn.Linear(hidden_size, hidden_size)
            self.kv = nn.Linear(hidden_size, 2 * kv_dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, T, D) -> q (N, H, T, hd), k and v (N, H_kv, T, hd)."""
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (N, T, D)
        else:
            q = self.q(x)  # (N, T, D)
            k, v = self.kv(x).chunk(2, dim=-1)  # each (N, T, H_kv*hd)
        return split_heads(q, self.num_heads), split_heads(k, self.num_kv_heads), split_heads(v, self.num_kv_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if checks_enabled():
            check_attention(q, k, v, None, self.proj.weight.dtype)
        return self.proj(attend(q, k, v))  # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the caption tokens (keys/values), grouped-query when num_kv_heads < num_heads.

    As in PixArt-α, no adaLN modulation, gate or normalisation: the block adds ``cross_attn(x, context, mask)``.
    Padding tokens (mask False) change nothing; a caption without any real token adds exactly 0.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False, num_kv_heads: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * self.num_kv_heads * self.head_dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, T, D) image tokens, context (N, L, D) projected caption tokens, mask (N, L) bool. Returns (N, T, D)."""
        q = split_heads(self.q(x), self.num_heads)  # (N, H, T, hd)
        k, v = (split_heads(z, self.num_kv_heads) for z in self.kv(context).chunk(2, dim=-1))  # (N, H_kv, L, hd)
        has_text = mask.any(dim=1)  # (N,)
        keys = (mask | ~has_text[:, None])[:, None, None, :]  # (N, 1, 1, L); all-padding rows: any finite softmax
        q, k = self.q_norm(q), self.k_norm(k)
        if checks_enabled():
            check_attention(q, k, v, keys, self.proj.weight.dtype)
        out = attend(q, k, v, keys)  # (N, T, D)
        return self.proj(out) * has_text[:, None, None].to(out.dtype)  # (N, T, D)

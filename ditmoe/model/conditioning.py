"""What a DiT is conditioned on: class labels (N,) or a caption, and the batch operations that treat both alike.

A caption is a frozen text encoder's token embeddings with their padding mask. Samplers, classifier-free
guidance and the trainer only cut, join and move conditions through the functions here, so they work
unchanged for class-conditional and text-conditioned models.
"""

from typing import NamedTuple

import torch
from torch import Tensor


class Caption(NamedTuple):
    """Text condition of N samples: ``tokens`` (N, L, text_dim) float embeddings of a frozen text encoder,
    ``mask`` (N, L) bool, True for real tokens and False for padding (padding changes nothing)."""

    tokens: Tensor
    mask: Tensor


Condition = Tensor | Caption  # (N,) int64 labels, or a Caption


def batch_size(y: Condition) -> int:
    return len(y.tokens) if isinstance(y, Caption) else len(y)


def cat_conditions(conditions: list[Condition]) -> Condition:
    """Conditions of several batches joined along the batch (captions padded to the longest)."""
    if not isinstance(conditions[0], Caption):
        return torch.cat(conditions)
    length = max(c.tokens.shape[1] for c in conditions)
    tokens = [torch.nn.functional.pad(c.tokens, (0, 0, 0, length - c.tokens.shape[1])) for c in conditions]
    masks = [torch.nn.functional.pad(c.mask, (0, length - c.mask.shape[1])) for c in conditions]
    return Caption(torch.cat(tokens), torch.cat(masks))


def index_condition(y: Condition, index) -> Condition:
    """``y[index]`` along the batch (a slice, a step slice or an index tensor)."""
    return Caption(y.tokens[index], y.mask[index]) if isinstance(y, Caption) else y[index]


def condition_to(y: Condition, device, non_blocking: bool = False) -> Condition:
    if isinstance(y, Caption):
        return Caption(y.tokens.to(device, non_blocking=non_blocking), y.mask.to(device, non_blocking=non_blocking))
    return y.to(device, non_blocking=non_blocking)

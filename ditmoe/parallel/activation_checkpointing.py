"""Per-block activation checkpointing applied from outside the model (parameter names unchanged)."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import DiT


def apply_activation_checkpointing(model: DiT, every: int) -> list[int]:
    """Recompute in backward the activations of blocks 0, n, 2n, ... (``every = n``; 0 turns it off).

    Non-reentrant checkpointing: RNG state is replayed and side outputs such as the MoE balance loss
    keep their gradient. Returns the indices of the checkpointed blocks.
    """
    chosen = checkpointed_blocks(len(model.blocks), every)
    for i in chosen:
        block = model.blocks[i]
        block.forward = _checkpointed(block, block.forward)
    return chosen


def checkpointed_blocks(depth: int, every: int) -> list[int]:
    """Indices 0, n, 2n, ... below ``depth`` for ``every = n`` (none for 0)."""
    if every < 0:
        raise ValueError(f"activation_checkpointing={every} must be >= 0 (0: off, n: every n-th block)")
    return list(range(0, depth, every)) if every else []


def _tensor_attributes(module: nn.Module) -> dict:
    """Tensors that (sub)modules keep as plain attributes, e.g. the MoE balance loss of the last forward."""
    return {(m, name): v for m in module.modules() for name, v in vars(m).items() if isinstance(v, torch.Tensor)}


def _checkpointed(block: nn.Module, forward):
    def run(*args):
        kept = None

        def once(*inputs):
            nonlocal kept
            try:
                return forward(*inputs)
            finally:
                if kept is None:  # the forward
                    kept = _tensor_attributes(block)
                else:  # recomputation in backward: its side outputs would keep the recomputed graph alive
                    for (module, name), value in kept.items():
                        setattr(module, name, value)

        return checkpoint(once, *args, use_reentrant=False)

    return run

"""Per-block activation checkpointing applied from outside the model (parameter names unchanged)."""

from torch.utils.checkpoint import checkpoint

from ..model import DiT


def apply_activation_checkpointing(model: DiT, every: int) -> list[int]:
    """Recompute in backward the activations of blocks 0, n, 2n, ... (``every = n``; 0 turns it off).

    Non-reentrant checkpointing: RNG state is replayed and side outputs such as the MoE balance loss
    keep their gradient. Returns the indices of the checkpointed blocks.
    """
    if every < 0:
        raise ValueError(f"activation_checkpointing={every} must be >= 0 (0: off, n: every n-th block)")
    chosen = list(range(0, len(model.blocks), every)) if every else []
    for i in chosen:
        block = model.blocks[i]
        block.forward = _checkpointed(block.forward)
    return chosen


def _checkpointed(forward):
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False)

    return run

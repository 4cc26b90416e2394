"""Regional compilation, applied from outside the model: each transformer block compiled on its own.

Blocks of one kind share their code, so torch.compile traces each kind once (parameters are graph
inputs) and a deep model compiles as fast as a shallow one. The MoE layer has only fixed shapes (see
``ditmoe.model.routing``), so a block is one graph with ``fullgraph=True``; under ZeRO-3, DeepSpeed's
per-module parameter hooks run inside the block and break its graph, so there it compiles without
``fullgraph``, and blocks with activation checkpointing stay eager: their recomputation in backward
runs the graph pieces between the hooks with other saved tensors than the forward did, which
``torch.utils.checkpoint`` rejects (pytorch/pytorch#166926).
"""

from collections.abc import Iterable

import torch

from ..model import DiT


def apply_compile(model: DiT, *, zero3: bool = False, checkpointed: Iterable[int] = ()) -> list[int]:
    """Compile the blocks' forwards in place (parameter names unchanged), before activation checkpointing
    wraps them; under ZeRO-3 the ``checkpointed`` blocks are left out. Returns the compiled block indices."""
    skip = set(checkpointed) if zero3 else set()
    compiled = [i for i in range(len(model.blocks)) if i not in skip]
    for i in compiled:
        block = model.blocks[i]
        block.forward = torch.compile(block.forward, fullgraph=not zero3, dynamic=False)
    return compiled

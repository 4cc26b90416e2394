"""Regional compilation, applied from outside the model: each transformer block compiled on its own, and
the regions around them: the embedding (patches, positions, timestep), the head (final layer, unpatchify)
and the objective's loss arithmetic.

Blocks of one kind share their code, so torch.compile traces each kind once (parameters are graph
inputs) and a deep model compiles as fast as a shallow one. The MoE layer has only fixed shapes (see
``ditmoe.model.routing``), so a block is one graph with ``fullgraph=True``; under ZeRO-3, DeepSpeed's
per-module parameter hooks run inside the regions and break their graphs, so there they compile without
``fullgraph``, and blocks with activation checkpointing stay eager: their recomputation in backward
runs the graph pieces between the hooks with other saved tensors than the forward did, which
``torch.utils.checkpoint`` rejects (pytorch/pytorch#166926). The label or caption embedding stays eager
(a lookup; at sampling it draws the classifier-free-guidance dropout).
"""

from collections.abc import Iterable
from typing import TypeVar

import torch

from ..model import DiT

ObjectiveT = TypeVar("ObjectiveT")


def apply_compile(model: DiT, *, zero3: bool = False, checkpointed: Iterable[int] = ()) -> list[int]:
    """Compile the blocks' forwards, ``model.embed`` and ``model.head`` in place (parameter names unchanged),
    before activation checkpointing wraps the blocks; under ZeRO-3 the ``checkpointed`` blocks are left out.
    Returns the compiled block indices."""
    skip = set(checkpointed) if zero3 else set()
    compiled = [i for i in range(len(model.blocks)) if i not in skip]
    for i in compiled:
        block = model.blocks[i]
        block.forward = torch.compile(block.forward, fullgraph=not zero3, dynamic=False)
    model.embed = torch.compile(model.embed, fullgraph=not zero3, dynamic=False)
    model.head = torch.compile(model.head, fullgraph=not zero3, dynamic=False)
    return compiled


def compile_loss(objective: ObjectiveT) -> ObjectiveT:
    """Compile a diffusion objective's loss arithmetic (its ``loss_terms``: one graph, forward and backward) in
    place."""
    objective.loss_terms = torch.compile(objective.loss_terms, fullgraph=True, dynamic=False)
    return objective

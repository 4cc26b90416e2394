"""Measure what one training forward+backward allocates, from the CPU allocator as torch's profiler
reports it; validates the planner (tests) and reports activation checkpointing (benchmarks)."""

import itertools
from collections.abc import Callable

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile


def forward_backward_memory(forward: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Run ``forward()`` (returns the loss) and its backward under the profiler. Returns the bytes
    allocated on top of what existed before: ``held_after_forward`` and the ``peak`` over both."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
        with record_function("backward"):
            loss.backward()
    events = prof.profiler.kineto_results.events()
    backward_start = next(e.start_ns() for e in events if e.name() == "backward")
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    allocated = list(itertools.accumulate(n for _, n in memory))  # live bytes after each event
    return {"held_after_forward": [a for (t, _), a in zip(memory, allocated) if t < backward_start][-1],
            "peak": max(allocated)}

"""Divergence: stop after N consecutive bad steps, and never checkpoint non-finite weights.

A step is bad when a micro-batch loss or the gradient norm is NaN or infinite, or when DeepSpeed skipped
it (bf16/fp16 overflow checks, when a DeepSpeed config enables them). The run of consecutive bad steps is
counted on the device, so a steady-state step does not wait for it; it is read on logging and checkpoint
steps. A few bad steps can be harmless (a skipped step leaves the weights as they were), so training stops
at ``max_nonfinite_steps`` in a row; whatever the count, a checkpoint is written only when every weight
and EMA tensor is finite.
"""

import torch
import torch.distributed as dist

from ..parallel.distributed import all_reduce


class TrainingDiverged(ValueError):
    """The run diverged: training stops without a checkpoint of that state (a ValueError: the command line
    reports it as ``error: ...`` and exits 1)."""


class DivergenceGuard:
    def __init__(self, limit: int, device: torch.device, step: int):
        self.limit = limit
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.run = zero.clone()  # consecutive bad steps up to now
        self.longest = zero.clone()  # longest run of bad steps since the last check
        self.bad_steps = zero.clone()  # bad steps since the last check
        self.checked_step = step  # the last step checked
        self.skipped_steps = None  # DeepSpeed's count of skipped steps, as last seen

    def record(self, nonfinite_losses: torch.Tensor, grad_norm, skipped_steps: int) -> None:
        """One step: its count of non-finite micro-batch losses, the gradient norm if the optimizer computed
        one (tensor or float) and DeepSpeed's running count of skipped steps."""
        bad = nonfinite_losses > 0
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
        if self.skipped_steps is not None and skipped_steps > self.skipped_steps:
            bad = torch.ones_like(bad)
        self.skipped_steps = skipped_steps
        self.run = (self.run + 1) * bad
        torch.maximum(self.longest, self.run, out=self.longest)
        self.bad_steps += bad

    def check(self, step: int) -> int:
        """Collective, reads the device: raise ``TrainingDiverged`` after ``limit`` bad steps in a row on any
        rank; returns the number of bad steps since the last check."""
        longest, bad = all_reduce(torch.stack([self.longest, self.bad_steps]), op=dist.ReduceOp.MAX).tolist()
        if longest >= self.limit:
            raise TrainingDiverged(
                f"{longest} consecutive steps had a NaN or infinite loss or gradient norm by step {step} "
                f"(max_nonfinite_steps={self.limit}): training stopped, no checkpoint written since step "
                f"{self.checked_step}; resume from an earlier checkpoint with a lower lr")
        self.longest.copy_(self.run)
        self.bad_steps.zero_()
        self.checked_step = step
        return int(bad)


def check_finite_weights(tensors: list[torch.Tensor], step: int) -> None:
    """Collective: raise ``TrainingDiverged`` if any of this rank's weight or EMA tensors (or another rank's)
    holds a NaN or infinity; one fused norm per dtype group, read once."""
    norms = torch._foreach_norm([t.detach() for t in tensors if t.numel()], ord=float("inf"))
    bad = torch.stack([~torch.isfinite(n) for n in norms]).any().long() if norms else torch.zeros((), dtype=torch.long)
    if all_reduce(bad, op=dist.ReduceOp.MAX).item():
        raise TrainingDiverged(f"the weights hold NaN or infinite values at step {step}: no checkpoint written "
                               f"(the previous one is kept); resume from it with a lower lr")

"""Preemption: a signal (SLURM's USR1 warning, or TERM) asks for a checkpoint at the next step boundary.

Ranks may receive the signal at different moments, so at every step boundary they agree with one
all-reduce (MAX): if any rank was signalled, all save the same step and stop together.
"""

import signal

import torch
import torch.distributed as dist

from ..parallel.distributed import all_reduce


class PreemptionGuard:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signalled = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has been signalled."""
        flag = torch.tensor([self.signalled], dtype=torch.int64)
        if dist.is_initialized():
            flag = all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

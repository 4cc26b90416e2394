"""Preemption: a signal (SLURM's USR1 warning, or TERM) asks for a checkpoint at a step boundary.

Ranks may receive the signal at different moments, so they agree on it with an all-reduce (MAX) of a
host-memory flag over a gloo group of their own: started without waiting at one step boundary and read
at the next, so it never blocks the device nor waits for the slowest rank. All ranks see the same
agreed value at the same boundary: they save the same step (one after the signal) and stop together.
"""

import signal

import torch
import torch.distributed as dist


class PreemptionGuard:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signalled = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._flag = torch.zeros(1, dtype=torch.int64)  # reduced in place; lives in host memory
        self._flag_view = self._flag.numpy()  # read without a tensor operation
        self._pending = None  # the all-reduce started at the last boundary

    def _handle(self, signum, frame):
        self.signalled = signum

    def should_stop(self) -> bool:
        """Collective, once per step boundary: True on every rank at the boundary after the one where any rank
        had been signalled."""
        if self._group is None:
            return bool(self.signalled)
        agreed = self._finish()
        self._flag_view[0] = self.signalled
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def _finish(self) -> bool:
        """Wait for the all-reduce in flight (if any); True if it found a signalled rank."""
        if self._pending is None:
            return False
        self._pending.wait()
        self._pending = None
        return bool(self._flag_view[0])

    def close(self):
        """End of training: complete the all-reduce in flight, so that no collective outlives the run."""
        if self._group is not None:
            self._finish()

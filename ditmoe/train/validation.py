"""Validation loss on held-out data: fixed noise, timesteps stratified over t, the same number on any world size.

Every held-out sample ``i`` is noised once in each of ``NUM_BUCKETS`` equal bands of diffusion time: at a
fraction ``u = (b + r) / K`` of the way from data to noise (``r`` uniform in [0, 1)), with noise ε; ``r`` and
ε come from a generator seeded by the run's seed alone. The (sample, band) items are cut into fixed batches
of ``batch_size`` (the last one filled up with the first items, so every forward has the same shape);
batch ``j`` runs on rank ``j mod W``, in eval mode, so each batch computes the same
numbers whatever the world size, and the per-item losses are summed into one vector that only its rank
fills (adding zeros is exact). The values thus repeat across runs, resumes and world sizes; they change
only with the weights.
"""

import math

import torch

from ..diffusion import GaussianDiffusion
from ..model.conditioning import Condition, condition_to, index_condition
from ..parallel.distributed import all_reduce

NUM_BUCKETS = 8  #: Bands of diffusion time the loss is reported in (and stratified over).


def item_timesteps(objective, fractions: torch.Tensor) -> torch.Tensor:
    """Diffusion times at ``fractions`` in [0, 1) of the way from data to noise: integer steps for DDPM,
    the flow time in (0, 1) for rectified flow."""
    if isinstance(objective, GaussianDiffusion):
        return (fractions * objective.num_timesteps).long().clamp_(0, objective.num_timesteps - 1)
    return fractions.clamp(1e-5, 1 - 1e-5)


class ValidationLoss:
    """The validation loss of held-out ``(x (N, C, H, W), y)`` under ``objective``; call with a model function."""

    def __init__(self, x: torch.Tensor, y: Condition, objective, *, seed: int, batch_size: int, rank: int,
                 world: int, device):
        n = len(x)
        self.objective, self.batch_size, self.rank, self.world, self.device = objective, batch_size, rank, world, device
        generator = torch.Generator().manual_seed(seed)
        bands = torch.arange(NUM_BUCKETS).repeat(n)  # item i * K + b is sample i in band b
        fractions = (bands + torch.rand(n * NUM_BUCKETS, generator=generator, dtype=torch.float64)) / NUM_BUCKETS
        self.samples = torch.arange(n).repeat_interleave(NUM_BUCKETS)  # (N K,)
        self.bands = bands
        self.t = item_timesteps(objective, fractions.float())  # (N K,)
        self.noise = torch.randn((n * NUM_BUCKETS, *x.shape[1:]), generator=generator)  # (N K, C, H, W)
        self.x, self.y = x, y
        self.num_batches = math.ceil(n * NUM_BUCKETS / batch_size)

    def _batch(self, j: int):
        """Items of batch ``j``, always ``batch_size`` of them: the last batch wraps around to the first items, so
        every forward on every rank has the same shape (expert parallelism exchanges equal token counts)."""
        items = torch.arange(j * self.batch_size, (j + 1) * self.batch_size) % len(self.samples)
        samples = self.samples[items]
        x0 = self.x[samples].to(self.device)
        y = condition_to(index_condition(self.y, samples), self.device)
        return items, x0, y

    @torch.no_grad()
    def __call__(self, forward) -> dict[str, float]:
        """Collective. ``forward(x_t, t, y)``: the model in eval mode. Returns 'loss' and 'mse' averaged over
        every item, and 'loss/tB' per band B (B = 0: nearest the data)."""
        per_item = torch.zeros(2, len(self.samples), dtype=torch.float64, device=self.device)
        rounds = math.ceil(self.num_batches / self.world)
        for r in range(rounds):  # every rank runs as many forwards (collectives under ZeRO-3 and EP)
            j = r * self.world + self.rank
            items, x0, y = self._batch(j if j < self.num_batches else 0)
            losses = self.objective.training_losses(forward, x0, y, t=self.t[items].to(self.device),
                                                    noise=self.noise[items].to(self.device))
            if j < self.num_batches:
                valid = min(self.batch_size, len(self.samples) - j * self.batch_size)  # wrapped items: computed once
                per_item[0, items[:valid]] = losses["loss"][:valid].double()
                per_item[1, items[:valid]] = losses["mse"][:valid].double()
        per_item = all_reduce(per_item).cpu()
        record = {"loss": per_item[0].mean().item(), "mse": per_item[1].mean().item()}
        for b in range(NUM_BUCKETS):
            record[f"loss/t{b}"] = per_item[0, self.bands == b].mean().item()
        return record

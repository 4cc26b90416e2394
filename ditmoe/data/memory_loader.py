"""A deterministic, checkpointable loader over in-memory tensors.

The sample stream is the concatenation of per-epoch permutations seeded by (seed, epoch); a step's
global batch is the next ``global_batch_size`` samples of the stream, the same on every rank, so the
result does not depend on the number of ranks. Its whole position is one integer.
"""

import torch


class MemoryLoader:
    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, global_batch_size: int, *, seed: int):
        if latents.shape[0] != labels.shape[0]:
            raise ValueError(f"latents ({latents.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        self.latents, self.labels = latents, labels
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.position = 0  # samples consumed since the start of training

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.labels), generator=gen)

    def next_global_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (G, C, H, W) latents and (G,) labels of the stream."""
        n = len(self.labels)
        positions = torch.arange(self.position, self.position + self.global_batch_size)
        epochs, offsets = positions // n, positions % n
        index = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            index[mask] = self._permutation(epoch)[offsets[mask]]
        self.position += self.global_batch_size
        return self.latents[index], self.labels[index]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if state["seed"] != self.seed:
            raise ValueError(f"data seed {self.seed} differs from the checkpoint's {state['seed']}")
        self.position = state["position"]

"""The losses and expert loads of one optimizer step, summed over its micro-batches on this rank."""

import torch

from ..parallel.distributed import all_reduce, all_reduce_mean

LOSS_KEYS = ("loss", "mse", "vb", "balance_loss")


class StepMetrics:
    def __init__(self, num_moe_layers: int, num_experts: int):
        self.loss_sums = torch.zeros(len(LOSS_KEYS))  # in the order of LOSS_KEYS
        self.expert_loads = torch.zeros(num_moe_layers, num_experts)  # tokens per expert, per MoE layer
        self.micro_batches = 0

    def add(self, *, loss: torch.Tensor, mse: torch.Tensor, vb: torch.Tensor, balance_loss: torch.Tensor,
            expert_counts: list[torch.Tensor]):
        """One micro-batch: its scalar losses and each MoE layer's (E,) expert counts."""
        self.loss_sums += torch.stack([loss, mse, vb, balance_loss]).detach().cpu()
        for i, counts in enumerate(expert_counts):
            self.expert_loads[i] += counts.float().cpu()
        self.micro_batches += 1

    def reduce(self) -> tuple[dict[str, float], torch.Tensor]:
        """Collective: ({loss key: mean over ranks and micro-batches}, expert loads summed over ranks)."""
        means = all_reduce_mean(self.loss_sums) / self.micro_batches
        return dict(zip(LOSS_KEYS, means.tolist())), all_reduce(self.expert_loads)

"""The losses and expert loads of one optimizer step, summed over its micro-batches on this rank.

Everything accumulates on the training device; nothing is read back until ``reduce`` (a logging step).
"""

import torch

from ..parallel.distributed import all_reduce, all_reduce_mean

LOSS_KEYS = ("loss", "mse", "vb", "balance_loss")


class StepMetrics:
    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        self.loss_sums = torch.zeros(len(LOSS_KEYS), device=device)  # in the order of LOSS_KEYS
        self.expert_loads = torch.zeros(num_moe_layers, num_experts, device=device)  # tokens per expert and layer
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=device)  # micro-batches with a NaN/inf loss
        self.micro_batches = 0
        self.grad_norm: torch.Tensor | None = None  # set when the trainer computes it itself (ZeRO-0)

    def add(self, *, loss: torch.Tensor, mse: torch.Tensor, vb: torch.Tensor, balance_loss: torch.Tensor,
            expert_counts: list[torch.Tensor]):
        """One micro-batch: its scalar losses and each MoE layer's (E,) expert counts."""
        losses = torch.stack([loss, mse, vb, balance_loss]).detach().float()
        self.loss_sums += losses
        self.nonfinite_losses += (~torch.isfinite(losses[0])).long()
        if expert_counts:
            self.expert_loads += torch.stack(expert_counts).float()
        self.micro_batches += 1

    def reduce(self) -> tuple[dict[str, float], torch.Tensor]:
        """Collective: ({loss key: mean over ranks and micro-batches}, expert loads summed over ranks)."""
        means = all_reduce_mean(self.loss_sums) / self.micro_batches
        return dict(zip(LOSS_KEYS, means.tolist())), all_reduce(self.expert_loads)

"""Feed-forward layers: DiT's dense GELU MLP (also EC-DiT's shared experts, without biases) and the SwiGLU
used by DiT-MoE's shared experts."""

import torch
import torch.nn.functional as F
from torch import nn


class GeluMLP(nn.Module):
    """Dense DiT feed-forward: ``fc1`` Linear -> GELU(tanh) -> ``fc2`` Linear, with biases unless ``bias=False``."""

    def __init__(self, hidden_size: int, mlp_hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=bias)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (the layout of DiT-MoE's experts)."""

    def __init__(self, hidden_size: int, ffn_hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.down_proj = nn.Linear(ffn_hidden, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

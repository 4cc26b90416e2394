"""Random weights for model tests: DiT's zero initialisations would hide whole paths of the network."""

import torch


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, 0.1²): leaves the zero initialisations so every path changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model

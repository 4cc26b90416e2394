"""The Hugging Face export's layout: ditmoe's names under ``DiTMoEModel``'s ``dit`` submodule."""

import torch

PREFIX = "dit."


def to_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ditmoe's names of an exported folder's tensors; a key outside ``dit.`` is kept for the model to reject."""
    return {key.removeprefix(PREFIX): value for key, value in state.items()}


def from_ditmoe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``DiTMoEModel``'s names of a ditmoe state."""
    return {PREFIX + key: value for key, value in state.items()}

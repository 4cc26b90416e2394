"""Bad configurations fail early with a message naming the option."""

import pytest

from ditmoe.model import get_preset
from ditmoe.model.config import DiTConfig


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'DiT-Z/2'"):
        get_preset("DiT-Z/2")


def test_top_k_larger_than_experts():
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"):
        DiTConfig(num_experts=2, top_k=3)


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_heads=16"):
        DiTConfig(hidden_size=100)


def test_latent_not_divisible_by_patch():
    with pytest.raises(ValueError, match="input_size=30 .* not divisible by patch_size=4"):
        DiTConfig(input_size=30, patch_size=4)


def test_unknown_routing_and_placement():
    with pytest.raises(ValueError, match="routing='hash'"):
        DiTConfig(num_experts=4, routing="hash")
    with pytest.raises(ValueError, match="moe_placement='odd'"):
        DiTConfig(num_experts=4, moe_placement="odd")


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown model config key"):
        DiTConfig.from_dict({"hidden": 3})

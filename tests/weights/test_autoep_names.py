"""DeepSpeed AutoEP's weight names: ``to_ditmoe(from_ditmoe(s))`` gives back ``s`` tensor for tensor (SwiGLU and
GELU experts, with a capacity predictor), and ``from_ditmoe`` writes gate rows as ``w1`` and up rows as ``w3``,
or the two halves of GELU's ``up_proj`` (checked against dicts built by hand)."""

import pytest
import torch

from ditmoe.model import DiT, get_preset
from ditmoe.weights import autoep

TINY = get_preset("tiny")  # 2 MoE blocks, 4 experts of SwiGLU width 128 (gate_up_proj (4, 256, 32))
GELU = get_preset("tiny-ec").replace(expert_activation="gelu", capacity_predictor=True)  # up_proj (4, 128, 32)
CONFIGS = {"tiny": TINY, "every_other": TINY.replace(moe_placement="every_other"),
           "no_shared": TINY.replace(num_shared_experts=0), "dense": TINY.replace(num_experts=0), "gelu": GELU,
           "EC-DiT-tiny": get_preset("EC-DiT-tiny")}


def random_state(config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in DiT(config).state_dict().items()}


def assert_same_state(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def hand_built_autoep(state: dict, in_proj: str = "gate_up_proj") -> dict:
    """AutoEP's names of a tiny state, written out without the adapter: w1/w3 are rows [0, half) / [half, 2·half)
    of the input projection (SwiGLU: (E, 2F, D), gate rows first; GELU: (E, F, D), halves of the units)."""
    out = {k: v for k, v in state.items() if ".mlp.gate." not in k and ".mlp.experts." not in k}
    for block in (0, 1):
        layer = f"blocks.{block}.mlp"
        rows = state[f"{layer}.experts.{in_proj}"]
        half = rows.shape[1] // 2
        out[f"{layer}.router.gate.weight"] = state[f"{layer}.gate.weight"]
        out[f"{layer}.experts.w1"] = rows[:, :half]
        out[f"{layer}.experts.w3"] = rows[:, half:]
        out[f"{layer}.experts.w2"] = state[f"{layer}.experts.down_proj"]
    return out


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
def test_round_trip(config):
    state = random_state(config)
    assert_same_state(autoep.to_ditmoe(autoep.from_ditmoe(state)), state)


def test_from_ditmoe_matches_the_hand_built_names():
    state = random_state(TINY)
    converted = autoep.from_ditmoe(state)
    assert_same_state(converted, hand_built_autoep(state))
    assert converted["blocks.0.mlp.experts.w1"].shape == (4, 128, 32)


def test_gelu_experts_are_the_halves_of_up_proj():
    state = random_state(GELU)
    converted = autoep.from_ditmoe(state)
    assert_same_state(converted, hand_built_autoep(state, "up_proj"))
    assert converted["blocks.0.mlp.experts.w1"].shape == (4, 64, 32)
    assert converted["blocks.0.mlp.experts.w2"].shape == (4, 32, 128)
    assert "blocks.0.mlp.capacity_predictor.0.weight" in converted  # the same name in both
    assert autoep.to_ditmoe(converted).keys() == state.keys()
    with pytest.raises(ValueError, match="neither SwiGLU"):
        autoep.to_ditmoe({**converted, "blocks.0.mlp.experts.w2": torch.zeros(4, 32, 96)})


def test_swapped_gate_and_up_rows_are_detected():
    state = random_state(TINY)
    swapped = dict(state)
    gate, up = state["blocks.1.mlp.experts.gate_up_proj"].chunk(2, dim=1)
    swapped["blocks.1.mlp.experts.gate_up_proj"] = torch.cat([up, gate], dim=1)
    with pytest.raises(AssertionError, match="blocks.1.mlp.experts.w"):
        assert_same_state(autoep.from_ditmoe(swapped), hand_built_autoep(state))


@pytest.mark.parametrize("config,in_proj", [(TINY, "gate_up_proj"), (GELU, "up_proj")], ids=["swiglu", "gelu"])
def test_per_name_lookup_cuts_each_autoep_tensor_from_ditmoe_names(config, in_proj):
    state = random_state(config)
    expected = hand_built_autoep(state, in_proj)
    for name in expected:
        assert torch.equal(autoep.ditmoe_tensor(name, state), expected[name]), name


def test_name_helpers():
    assert autoep.expert_layer("blocks.3.mlp.experts.w3") == "blocks.3.mlp"
    assert autoep.expert_layer("blocks.3.mlp.experts.gate_up_proj") is None
    assert autoep.expert_layer("blocks.3.mlp.shared_experts.down_proj.weight") is None
    assert autoep.is_autoep_name("blocks.0.mlp.router.gate.weight")
    assert not autoep.is_autoep_name("blocks.0.mlp.gate.weight")
    names = list(autoep.from_ditmoe(random_state(TINY)))
    assert autoep.autoep_layers(names) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert autoep.ditmoe_layers(names) == []
    assert autoep.ditmoe_layers(random_state(GELU)) == ["blocks.0.mlp", "blocks.1.mlp"]

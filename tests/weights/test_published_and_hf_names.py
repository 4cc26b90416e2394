"""Weight-name adapters of the published layouts (feizc/DiT-MoE, facebookresearch/DiT) and of the Hugging
Face export: ``to_ditmoe(from_ditmoe(s))`` gives back ``s`` tensor for tensor, and ``from_ditmoe``
writes the names each layout defines (checked against dicts built here by hand)."""

import pytest
import torch

from ditmoe.model import DiT, get_preset
from ditmoe.weights import dit, hf, official_ditmoe

TINY = get_preset("tiny")  # 2 blocks, width 32, 4 experts of SwiGLU width 128, shared SwiGLU width 64
MOE_CONFIGS = {"tiny": TINY, "qk_norm": TINY.replace(qk_norm=True),
               "every_other": TINY.replace(moe_placement="every_other"),
               "no_shared": TINY.replace(num_shared_experts=0)}
DENSE = TINY.replace(num_experts=0)


def random_state(config) -> dict[str, torch.Tensor]:
    """A DiT's state dict with every learned tensor random (so that any swap shows); ``pos_embed`` as built."""
    torch.manual_seed(0)
    return {k: v if k == "pos_embed" else torch.randn_like(v) for k, v in DiT(config).state_dict().items()}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def without_pos_embed(state: dict) -> dict:
    """ditmoe computes pos_embed; the published importers check the stored table and leave it out."""
    return {k: v for k, v in state.items() if k != "pos_embed"}


@pytest.mark.parametrize("config", MOE_CONFIGS.values(), ids=MOE_CONFIGS)
def test_official_ditmoe_round_trip(config):
    state = random_state(config)
    assert_same_state(official_ditmoe.to_ditmoe(official_ditmoe.from_ditmoe(state)), without_pos_embed(state))


def test_official_ditmoe_layout_by_hand():
    state = random_state(TINY)
    published = official_ditmoe.from_ditmoe(state)
    expected = {k: v for k, v in state.items() if not (k.startswith("blocks.") and ".mlp." in k)}
    for i in range(TINY.depth):
        gate_up, down = state[f"blocks.{i}.mlp.experts.gate_up_proj"], state[f"blocks.{i}.mlp.experts.down_proj"]
        for j in range(TINY.num_experts):
            expected[f"blocks.{i}.moe.experts.{j}.gate_proj.weight"] = gate_up[j, :128]
            expected[f"blocks.{i}.moe.experts.{j}.up_proj.weight"] = gate_up[j, 128:]
            expected[f"blocks.{i}.moe.experts.{j}.down_proj.weight"] = down[j]
        expected[f"blocks.{i}.moe.gate.weight"] = state[f"blocks.{i}.mlp.gate.weight"]
        for w in ("gate_proj", "up_proj", "down_proj"):
            expected[f"blocks.{i}.moe.shared_experts.{w}.weight"] = state[f"blocks.{i}.mlp.shared_experts.{w}.weight"]
    assert_same_state(published, expected)
    assert "blocks.0.attn.qkv.weight" in published and "blocks.0.attn.proj.bias" in published  # timm's names


def test_official_ditmoe_mutations_are_caught():
    state = random_state(TINY)
    published = official_ditmoe.from_ditmoe(state)
    gate, up = "blocks.1.moe.experts.2.gate_proj.weight", "blocks.1.moe.experts.2.up_proj.weight"
    swapped = {**published, gate: published[up], up: published[gate]}
    converted = official_ditmoe.to_ditmoe(swapped)
    assert not torch.equal(converted["blocks.1.mlp.experts.gate_up_proj"], state["blocks.1.mlp.experts.gate_up_proj"])
    renamed = {("blocks.1.moe.experts.2.upper_proj.weight" if k == up else k): v for k, v in published.items()}
    with pytest.raises(KeyError, match="missing key 'blocks.1.moe.experts.2.up_proj.weight'"):
        official_ditmoe.to_ditmoe(renamed)
    extra = {**published, "blocks.0.moe.experts.4.down_proj.weight": torch.zeros(32, 128)}
    with pytest.raises(KeyError, match=r"unexpected keys for this architecture: \['blocks.0.moe.experts.4"):
        official_ditmoe.to_ditmoe(extra)
    shifted = {**published, "pos_embed": published["pos_embed"] + 0.01}
    with pytest.raises(ValueError, match="pos_embed is not the 2-D sin-cos table"):
        official_ditmoe.to_ditmoe(shifted)


def test_dit_round_trip_and_layout():
    state = random_state(DENSE)
    published = dit.from_ditmoe(state)
    assert_same_state(published, state)  # DiT's names are ditmoe's dense names, pos_embed stored
    assert "blocks.1.mlp.fc1.weight" in published and "blocks.1.attn.qkv.weight" in published
    assert_same_state(dit.to_ditmoe(published), without_pos_embed(state))


def test_dit_reads_flash_attention_names_and_rejects_experts():
    state = random_state(DENSE)
    flash = {k.replace("attn.qkv.", "attn.Wqkv.").replace("attn.proj.", "attn.out_proj."): v for k, v in state.items()}
    assert "blocks.0.attn.Wqkv.weight" in flash and "blocks.0.attn.out_proj.bias" in flash
    assert_same_state(dit.to_ditmoe(flash), without_pos_embed(state))
    with pytest.raises(KeyError, match="unexpected keys for this architecture"):
        dit.from_ditmoe(random_state(TINY))
    with pytest.raises(KeyError, match=r"unexpected keys for this architecture: \['blocks.0.moe.gate.weight'\]"):
        dit.to_ditmoe({**state, "blocks.0.moe.gate.weight": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="pos_embed is not the 2-D sin-cos table"):
        dit.to_ditmoe({**state, "pos_embed": state["pos_embed"].flip(1)})


@pytest.mark.parametrize("config", [TINY, DENSE], ids=["moe", "dense"])
def test_hf_round_trip_and_the_models_names(config):
    from ditmoe.hf.configuration_ditmoe import DiTMoEConfig
    from ditmoe.hf.modeling_ditmoe import DiTMoEModel

    state = random_state(config)
    exported = hf.from_ditmoe(state)
    assert_same_state(exported, {f"dit.{k}": v for k, v in state.items()})
    assert sorted(exported) == sorted(DiTMoEModel(DiTMoEConfig.from_dit_config(config)).state_dict())
    assert_same_state(hf.to_ditmoe(exported), state)

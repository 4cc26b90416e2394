"""Sparse upcycling (``ditmoe.weights.upcycle``) and the init-weights format (``ditmoe.train.init_from``).

Right after upcycling, with token choice and renormalised top-k weights, the MoE model computes the dense
model's function: every routed expert is a copy of the MLP and the k weights sum to 1. Checked here on random
dense weights (zero MLP biases in the MoE blocks: ditmoe's experts have none), by running both models.
"""

import json

import pytest
import torch

from ditmoe.model import DiT, DiTConfig
from ditmoe.model.conditioning import Caption
from ditmoe.train.init_from import RECORD_FILE, WEIGHTS_FILE, load_init_weights, write_init_weights
from ditmoe.weights import upcycle as up
from ditmoe.weights.upcycle import output_difference, upcycle

DENSE = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                  mlp_ratio=2.0)
# the exact target: GELU experts as wide as the MLP, top-k weights renormalised, no shared experts
MOE = DENSE.replace(num_experts=4, top_k=2, norm_topk_prob=True, expert_activation="gelu", expert_ratio=2.0,
                    num_shared_experts=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The CPU cores are shared."""


def random_dense(config: DiTConfig, zero_biases=lambda block: True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the dense ``config`` (every tensor non-trivial: adaLN gates and the output layer are not
    zero), with the MLP biases of the blocks ``zero_biases(i)`` picks set to zero."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if ".mlp.fc" in name and name.endswith(".bias") and zero_biases(int(name.split(".")[1])):
                p.zero_()
    return model.state_dict()


def forward(config: DiTConfig, state: dict, x, t, y) -> torch.Tensor:
    model = DiT(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x, t, y, torch.zeros(len(x), dtype=torch.bool))


def inputs(config: DiTConfig, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    if config.is_text:
        mask = torch.ones(n, config.text_len, dtype=torch.bool)
        mask[0, -2:] = False
        return x, t, Caption(torch.randn(n, config.text_len, config.text_dim, generator=g), mask)
    return x, t, torch.randint(0, config.num_classes, (n,), generator=g)


def assert_equal_outputs(dense_config, source, target_config, target):
    x, t, y = inputs(dense_config)
    dense = forward(dense_config, source, x, t, y)
    moe = forward(target_config, target, x, t, y)
    assert (moe - dense).abs().max() < 1e-5
    # not vacuous: without its experts' output, the MoE model is another function
    silenced = {k: torch.zeros_like(v) if k.endswith("experts.down_proj") else v for k, v in target.items()}
    assert (forward(target_config, silenced, x, t, y) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("target", [
    MOE,
    MOE.replace(top_k=1),
    MOE.replace(top_k=4, norm_topk_prob=False),  # all experts: the softmax weights sum to 1 already
    MOE.replace(num_shared_experts=2, shared_expert_ratio=0.5),  # shared experts start at zero output
    MOE.replace(moe_placement="every_other"),
    MOE.replace(moe_placement="deep_half", num_experts=8, top_k=3),
], ids=["top2", "top1", "top4-of-4", "shared", "every_other", "deep_half-8e"])
def test_token_choice_upcycling_computes_the_dense_model(target):
    source = random_dense(DENSE)
    result = upcycle(source, DENSE, target)
    assert result.exact and result.notes == []
    assert_equal_outputs(DENSE, source, target, result.state)
    assert output_difference(source, DENSE, result.state, target) < 1e-5


def test_text_conditioned_upcycling_computes_the_dense_model():
    dense = DENSE.replace(num_kv_heads=1, text_dim=16, text_len=6, pooled_text=True, learn_sigma=False)
    target = MOE.replace(num_kv_heads=1, text_dim=16, text_len=6, pooled_text=True, learn_sigma=False)
    source = random_dense(dense)
    result = upcycle(source, dense, target)
    assert result.exact
    assert_equal_outputs(dense, source, target, result.state)


def test_dense_blocks_keep_their_mlp_biases_exactly():
    """Only MoE blocks lose the biases: with MoE in odd blocks, biases of even blocks may be anything."""
    target = MOE.replace(moe_placement="every_other")
    source = random_dense(DENSE, zero_biases=lambda block: block % 2 == 1)
    assert source["blocks.0.mlp.fc1.bias"].abs().sum() > 0
    result = upcycle(source, DENSE, target)
    assert result.exact
    assert torch.equal(result.state["blocks.0.mlp.fc2.bias"], source["blocks.0.mlp.fc2.bias"])
    assert_equal_outputs(DENSE, source, target, result.state)


def test_every_tensor_is_accounted_for():
    target = MOE.replace(moe_placement="every_other", num_shared_experts=1, shared_expert_ratio=1.0)
    source = random_dense(DENSE)
    result = upcycle(source, DENSE, target)
    target_names = DiT(target).state_dict().keys()
    assert result.source_kinds.keys() == source.keys()
    assert result.target_kinds.keys() == target_names == result.state.keys()
    assert set(result.source_kinds.values()) <= set(up.SOURCE_KINDS)
    assert set(result.target_kinds.values()) <= set(up.TARGET_KINDS)
    moe_blocks = 2  # blocks 1 and 3 of 4
    counts = result.counts()
    assert counts["source"] == {
        up.SOURCE_COPIED: len(source) - 1 - 4 * moe_blocks, up.SOURCE_EXPERTS: 2 * moe_blocks,
        up.SOURCE_ZERO_BIAS: 2 * moe_blocks, up.SOURCE_DROPPED_BIAS: 0, up.SOURCE_CHECKED: 1,
    }
    assert counts["target"] == {
        up.TARGET_COPIED: len(source) - 1 - 4 * moe_blocks, up.TARGET_EXPERTS: 2 * moe_blocks,
        up.TARGET_ROUTER: moe_blocks, up.TARGET_SHARED: 2 * moe_blocks, up.TARGET_PREDICTOR: 0, up.TARGET_COMPUTED: 1,
    }
    assert sum(counts["source"].values()) == len(source) and sum(counts["target"].values()) == len(target_names)
    assert result.source_kinds["blocks.1.mlp.fc1.weight"] == up.SOURCE_EXPERTS
    assert result.source_kinds["blocks.0.mlp.fc1.weight"] == up.SOURCE_COPIED  # a dense block
    assert result.target_kinds["blocks.1.mlp.gate.weight"] == up.TARGET_ROUTER
    table = result.table()
    assert f"source tensors: {len(source)}" in table and f"target tensors: {len(target_names)}" in table


def test_experts_are_copies_and_fresh_tensors_follow_the_scheme():
    target = MOE.replace(num_shared_experts=1, shared_expert_ratio=1.0)
    source = random_dense(DENSE)
    state = upcycle(source, DENSE, target, router_std=0.5, seed=3).state
    up_proj, down = state["blocks.2.mlp.experts.up_proj"], state["blocks.2.mlp.experts.down_proj"]
    assert up_proj.shape == (4, 64, 32) and down.shape == (4, 32, 64)
    for e in range(4):
        assert torch.equal(up_proj[e], source["blocks.2.mlp.fc1.weight"])
        assert torch.equal(down[e], source["blocks.2.mlp.fc2.weight"])
    assert not state["blocks.2.mlp.shared_experts.fc2.weight"].any()  # shared experts start silent
    assert state["blocks.2.mlp.shared_experts.fc1.weight"].std() > 0
    assert 0.4 < state["blocks.2.mlp.gate.weight"].std() < 0.6
    again = upcycle(source, DENSE, target, router_std=0.5, seed=3).state
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = upcycle(source, DENSE, target, router_std=0.5, seed=4).state
    assert not torch.equal(state["blocks.2.mlp.gate.weight"], other["blocks.2.mlp.gate.weight"])


def test_noise_breaks_the_symmetry_and_the_equality_but_keeps_the_shapes():
    source = random_dense(DENSE)
    exact = upcycle(source, DENSE, MOE).state
    noisy = upcycle(source, DENSE, MOE, noise_std=0.05)
    assert not noisy.exact and "noise_std=0.05" in noisy.notes[0]
    assert {k: v.shape for k, v in noisy.state.items()} == {k: v.shape for k, v in exact.items()}
    up_proj = noisy.state["blocks.0.mlp.experts.up_proj"]
    assert not torch.equal(up_proj[0], up_proj[1])
    assert 0.03 < (up_proj - exact["blocks.0.mlp.experts.up_proj"]).std() < 0.07
    assert output_difference(source, DENSE, noisy.state, MOE) > 1e-4


def test_expert_choice_and_unnormalised_top_k_are_upcycled_with_a_note():
    source = random_dense(DENSE)
    ec = MOE.replace(routing="expert_choice", capacity_factor=2.0, capacity_predictor=True)
    result = upcycle(source, DENSE, ec)
    assert not result.exact and "expert choice" in result.notes[0] and "token choice only" in result.notes[0]
    assert result.counts()["target"][up.TARGET_PREDICTOR] == 4 * 4  # 4 blocks x (2 weights + 2 biases)
    DiT(ec).load_state_dict(result.state)
    unnormalised = upcycle(source, DENSE, MOE.replace(norm_topk_prob=False))
    assert not unnormalised.exact and "norm_topk_prob=true" in unnormalised.notes[0]
    assert output_difference(source, DENSE, unnormalised.state, MOE.replace(norm_topk_prob=False)) > 1e-4


def test_nonzero_mlp_biases_are_refused_unless_dropped():
    source = random_dense(DENSE, zero_biases=lambda block: False)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.bias is not zero .*--drop-mlp-biases"):
        upcycle(source, DENSE, MOE)
    result = upcycle(source, DENSE, MOE, drop_mlp_biases=True)
    assert not result.exact and "drop_mlp_biases" in result.notes[0]
    assert result.counts()["source"][up.SOURCE_DROPPED_BIAS] == 2 * DENSE.depth
    assert result.source_kinds.keys() == source.keys()


@pytest.mark.parametrize("target, message", [
    (MOE.replace(expert_activation="swiglu"), "SwiGLU expert cannot compute the dense GELU MLP"),
    (MOE.replace(expert_ratio=4.0), r"expert width 128 .* differs from the dense MLP's width 64 .*expert_ratio=2.0"),
    (MOE.replace(depth=2), "depth: source 4 vs target 2"),
    (MOE.replace(num_heads=4, hidden_size=32), "num_heads: source 2 vs target 4"),
    (DENSE, "the target config is dense"),
])
def test_incompatible_targets_are_refused(target, message):
    with pytest.raises(ValueError, match=message):
        upcycle(random_dense(DENSE), DENSE, target)


def test_a_moe_source_and_a_stray_tensor_are_refused():
    source = random_dense(DENSE)
    with pytest.raises(ValueError, match="already has experts"):
        upcycle(source, MOE, MOE)
    with pytest.raises(ValueError, match=r"unexpected source tensor.*blocks\.0\.mlp\.extra"):
        upcycle({**source, "blocks.0.mlp.extra": torch.zeros(1)}, DENSE, MOE)
    missing = {k: v for k, v in source.items() if k != "blocks.3.mlp.fc2.weight"}
    with pytest.raises(ValueError, match="no tensor 'blocks.3.mlp.fc2.weight'"):
        upcycle(missing, DENSE, MOE)
    with pytest.raises(ValueError, match="pos_embed"):
        upcycle({**source, "pos_embed": source["pos_embed"] + 1}, DENSE, MOE)


# ----------------------------------------------------------------------------------------------- init weights

@pytest.fixture
def init_folder(tmp_path):
    result = upcycle(random_dense(DENSE), DENSE, MOE)
    write_init_weights(tmp_path / "init", result.state, MOE, {"exact": True})
    return tmp_path / "init", result.state


def test_load_init_weights_gives_the_weights_for_a_strict_load(init_folder):
    folder, state = init_folder
    assert json.loads((folder / RECORD_FILE).read_text())["model_config"] == MOE.to_dict()
    for path in (folder, folder / WEIGHTS_FILE):
        loaded = load_init_weights(path, MOE)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    DiT(MOE).load_state_dict(load_init_weights(folder, MOE))
    # loss weights and the sampling threshold change no weight: a run may set them otherwise
    load_init_weights(folder, MOE.replace(balance_loss_alpha=0.0))


def test_load_init_weights_refuses_another_config_naming_the_file(init_folder):
    folder, _ = init_folder
    with pytest.raises(ValueError) as err:
        load_init_weights(folder, MOE.replace(num_experts=8, top_k=2))
    assert str(folder / RECORD_FILE) in str(err.value) and "num_experts: weights 4 vs run 8" in str(err.value)
    with pytest.raises(ValueError, match="top_k: weights 2 vs run 1"):
        load_init_weights(folder, MOE.replace(top_k=1))


def test_load_init_weights_errors_name_the_file(init_folder, tmp_path):
    folder, state = init_folder
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_init_weights(tmp_path / "nowhere", MOE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"missing {RECORD_FILE}"):
        load_init_weights(tmp_path / "empty", MOE)
    torch.save({k: v for k, v in state.items() if k != "blocks.0.mlp.gate.weight"}, folder / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}: missing tensors \['blocks.0.mlp.gate.weight'\]"):
        load_init_weights(folder, MOE)
    torch.save({**state, "blocks.0.mlp.gate.weight": torch.zeros(3, 32)}, folder / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"other shapes: blocks.0.mlp.gate.weight \(3, 32\) \(needs \(4, 32\)\)"):
        load_init_weights(folder, MOE)
    (folder / WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} is truncated or corrupt"):
        load_init_weights(folder, MOE)
    (folder / RECORD_FILE).write_text("{")
    with pytest.raises(ValueError, match=f"{RECORD_FILE} is not UTF-8 JSON"):
        load_init_weights(folder, MOE)

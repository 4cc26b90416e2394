"""RoutingRecorder counts exactly the assignments the routers make, for token and expert choice."""

import numpy as np
import pytest
import torch

from ditmoe.analysis import RoutingRecorder, RoutingStats
from ditmoe.diffusion import build_objective
from ditmoe.model import DiT, get_preset
from ditmoe.model.routing import expert_capacity
from ditmoe.sampling import generate

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: no spinning against other processes


def sample_and_record(preset: str, batches: list[torch.Tensor], cfg_scale: float = 1.5):
    """Sample ``batches`` of labels with DDIM; returns (stats, assignments seen by an independent hook)."""
    torch.manual_seed(0)
    model = DiT(get_preset(preset)).eval()
    seen = []  # (layer, step, labels (N,), token_index, expert_index) per MoE call
    calls = {"labels": None, "step": -1}

    def on_call(module, args):
        calls["labels"], calls["step"] = args[2].clone(), calls["step"] + 1

    def on_routing(layer, module, routing, shape):
        seen.append((layer, calls["step"] % STEPS, calls["labels"], routing.token_index.clone(),
                     routing.expert_index.clone()))

    model.register_forward_pre_hook(on_call)
    for i, layer in enumerate(model.moe_layers()):
        layer.register_routing_hook(lambda m, r, s, i=i: on_routing(i, m, r, s))
    with RoutingRecorder(model) as recorder:
        for b, labels in enumerate(batches):
            recorder.start_run()
            generate(model, build_objective("ddpm"), labels, cfg_scale=cfg_scale, sampler="ddim", steps=STEPS, seed=b)
    return model, recorder.stats(), seen


def expected_counts(seen, num_layers, num_classes, num_tokens, num_experts):
    """The recorder's arrays recomputed with numpy from the raw Routing assignments."""
    by_class = np.zeros((num_layers, num_classes + 1, num_experts), np.int64)
    by_position = np.zeros((num_layers, num_tokens, num_experts), np.int64)
    by_step = np.zeros((num_layers, STEPS, num_experts), np.int64)
    coverage = np.zeros((num_layers, STEPS, num_experts + 1), np.int64)
    for layer, step, labels, token, expert in seen:
        token, expert = token.numpy(), expert.numpy()
        np.add.at(by_class[layer], (labels.numpy()[token // num_tokens], expert), 1)
        np.add.at(by_position[layer], (token % num_tokens, expert), 1)
        np.add.at(by_step[layer, step], expert, 1)
        per_token = np.bincount(token, minlength=len(labels) * num_tokens)
        np.add.at(coverage[layer, step], per_token, 1)
    return by_class, by_position, by_step, coverage


@pytest.mark.parametrize("preset", ["tiny", "tiny-ec"])
def test_recorder_counts_equal_routing_assignments(preset):
    batches = [torch.tensor([0, 1, 2, 3, 3]), torch.tensor([7, 9, 9])]
    model, stats, seen = sample_and_record(preset, batches)
    cfg = model.config
    n, t, e, k = 8, cfg.num_tokens, cfg.num_experts, cfg.num_classes  # 8 samples, 16 tokens, 4 experts
    by_class, by_position, by_step, coverage = expected_counts(seen, 2, k, t, e)
    np.testing.assert_array_equal(stats.by_class, by_class)
    np.testing.assert_array_equal(stats.by_position, by_position)
    np.testing.assert_array_equal(stats.by_step, by_step)
    np.testing.assert_array_equal(stats.coverage, coverage)
    np.testing.assert_array_equal(stats.total, by_step.sum(axis=1))
    assert stats.layer_blocks.tolist() == [0, 1]
    # Every step sees the 8 samples twice (CFG: conditional + null half).
    assert stats.tokens_by_step.tolist() == [2 * n * t] * STEPS
    assert stats.tokens_by_position.tolist() == [2 * n * STEPS] * t
    samples_per_class = np.bincount(torch.cat(batches).numpy(), minlength=k)
    assert stats.tokens_by_class.tolist() == [*(samples_per_class * STEPS * t), n * STEPS * t]
    spaced = build_objective("ddpm").respace(f"ddim{STEPS}")
    assert stats.step_timesteps.tolist() == spaced.timestep_map[::-1].tolist()
    if preset == "tiny":  # every token makes top_k = 2 assignments
        assert (stats.by_step.sum(axis=2) == 2 * n * t * cfg.top_k).all()
        assert (stats.coverage[:, :, cfg.top_k] == 2 * n * t).all()
        assert (stats.coverage.sum(axis=2) == stats.coverage[:, :, cfg.top_k]).all()
    else:  # every expert takes C tokens of every sample, whatever its class or step
        c = expert_capacity(cfg.capacity_factor, t, e)
        assert c == 8
        assert (stats.by_step == 2 * n * c).all()
        assert (stats.by_class[:, :k] == samples_per_class[None, :, None] * STEPS * c).all()
        assert (stats.by_class[:, k] == n * STEPS * c).all()
        assert (stats.coverage.sum(axis=2) == 2 * n * t).all()
        assert ((stats.coverage * np.arange(e + 1)).sum(axis=2) == 2 * n * e * c).all()
        assert stats.coverage[..., [0, 3, 4]].sum() > 0  # some tokens get fewer or more experts than 2
    np.testing.assert_allclose(stats.frequency("step").sum(axis=2), 2.0)


def test_recorder_removes_its_hooks():
    model, stats, _ = sample_and_record("tiny", [torch.tensor([1, 2])], cfg_scale=1.0)
    assert stats.tokens_by_class[-1] == 0  # no guidance, no null label
    assert np.isnan(stats.frequency("class")[:, -1]).all()
    assert len(model._forward_pre_hooks) == 1  # only the test's own hook is left
    assert all(len(layer._routing_hooks) == 1 for layer in model.moe_layers())


def test_recorder_rejects_runs_with_another_schedule_and_dense_models():
    model = DiT(get_preset("tiny")).eval()
    objective = build_objective("ddpm")
    with RoutingRecorder(model) as recorder:
        generate(model, objective, torch.tensor([0]), sampler="ddim", steps=3)
        recorder.start_run()
        with pytest.raises(ValueError, match="step 0 has timestep 750 but 668 in the first run"):
            generate(model, objective, torch.tensor([0]), sampler="ddim", steps=4)
    with pytest.raises(ValueError, match="no MoE layers"):
        RoutingRecorder(DiT(get_preset("tiny").replace(num_experts=0)))


def test_summary_names_the_most_specialised_experts():
    zeros = np.zeros
    stats = RoutingStats(
        routing="token_choice", num_classes=2, grid_size=1, layer_blocks=np.array([3]),
        step_timesteps=np.array([999.0, 0.0]),
        by_class=np.array([[[10, 10], [19, 3], [0, 0]]]),  # (L, K+1, E): expert 0 prefers class 1
        by_position=np.array([[[29, 13]]]),
        by_step=np.array([[[15, 5], [14, 8]]]),  # expert 1 is chosen more at the last step
        total=np.array([[29, 13]]),
        coverage=zeros((1, 2, 3)), tokens_by_class=np.array([20, 20, 0]), tokens_by_position=np.array([40]),
        tokens_by_step=np.array([20, 20]),
    )
    layer = stats.summary()["layers"][0]
    assert layer["block"] == 3
    assert layer["expert_load"] == pytest.approx([29 / 42, 13 / 42])
    assert layer["selection_frequency"] == pytest.approx([29 / 40, 13 / 40])
    assert layer["class_range"] == pytest.approx([0.45, 0.35])
    assert layer["most_class_specialised"] == {"expert": 0, "highest": {"class": "1", "frequency": 0.95},
                                               "lowest": {"class": "0", "frequency": 0.5}}
    assert layer["step_range"] == pytest.approx([0.05, 0.15])
    assert layer["most_step_specialised"] == {"expert": 1, "highest": {"step": "1", "frequency": 0.4},
                                              "lowest": {"step": "0", "frequency": 0.25}}
    assert layer["position_range"] == [0.0, 0.0]

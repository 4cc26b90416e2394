"""RoutingRecorder counts exactly the assignments the routers make, for token and expert choice."""

import numpy as np
import pytest
import torch

from ditmoe.analysis import RoutingRecorder, RoutingStats
from ditmoe.diffusion import build_objective
from ditmoe.model import DiT, DiTConfig, get_preset
from ditmoe.model.moe import set_capacity_threshold
from ditmoe.model.routing import expert_capacity, pool_sizes
from ditmoe.sampling import generate

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: no spinning against other processes


def sample_and_record(preset: str | DiTConfig, batches: list[torch.Tensor], cfg_scale: float = 1.5,
                      threshold: float | None = None):
    """Sample ``batches`` of labels with DDIM; returns (stats, assignments seen by an independent hook)."""
    torch.manual_seed(0)
    model = DiT(get_preset(preset) if isinstance(preset, str) else preset).eval()
    if threshold is not None:
        set_capacity_threshold(model, threshold)
    seen = []  # (layer, step, labels (N,), token_index, expert_index) per MoE call
    calls = {"labels": None, "step": -1}

    def on_call(module, args):
        calls["labels"], calls["step"] = args[2].clone(), calls["step"] + 1

    def on_routing(layer, module, routing, shape):
        seen.append((layer, calls["step"] % STEPS, calls["labels"], routing.token_index.clone(),
                     routing.expert_index.clone(), shape))

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
    for layer, step, labels, token, expert, _ in seen:
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
        tokens_by_step=np.array([20, 20]), routing_pool="sample", routing_group_size=0, pools=np.array([20, 20]),
        pool_expert_min=np.array([4]), pool_expert_max=np.array([11]), sample_experts_min=np.array([0.5]),
        sample_experts_max=np.array([1.5]),
    )
    layer = stats.summary()["layers"][0]
    assert layer["block"] == 3
    assert layer["tokens_per_expert_per_pool"] == {"min": 4, "mean": 42 / 2 / 2, "max": 11}
    assert layer["experts_per_token_per_sample"] == {"min": 0.5, "mean": 42 / 40, "max": 1.5}
    assert layer["expert_load"] == pytest.approx([29 / 42, 13 / 42])
    assert layer["selection_frequency"] == pytest.approx([29 / 40, 13 / 40])
    assert layer["class_range"] == pytest.approx([0.45, 0.35])
    assert layer["most_class_specialised"] == {"expert": 0, "highest": {"class": "1", "frequency": 0.95},
                                               "lowest": {"class": "0", "frequency": 0.5}}
    assert layer["step_range"] == pytest.approx([0.05, 0.15])
    assert layer["most_step_specialised"] == {"expert": 1, "highest": {"step": "1", "frequency": 0.4},
                                              "lowest": {"step": "0", "frequency": 0.25}}
    assert layer["position_range"] == [0.0, 0.0]


def pool_extremes(seen, config):
    """(L, 2) min/max tokens per expert in a pool and (L, 2) min/max mean experts per token of a sample, with numpy."""
    t, e = config.num_tokens, config.num_experts
    pools, samples = {}, {}
    for layer, _, _, token, expert, (n, _) in seen:
        token, expert = token.numpy(), expert.numpy()
        ends = np.cumsum(pool_sizes(config.routing_pool, config.routing_group_size, n, t))
        counts = np.zeros((len(ends), e), np.int64)
        np.add.at(counts, (np.searchsorted(ends, token, side="right"), expert), 1)
        pools.setdefault(layer, []).extend(counts.ravel())
        samples.setdefault(layer, []).extend(np.bincount(token // t, minlength=n) / t)
    return ([[min(v[i]), max(v[i])] for i in sorted(v)] for v in (pools, samples))


TINY_EC = get_preset("tiny-ec")


@pytest.mark.parametrize("name,config,threshold", [
    ("token choice", get_preset("tiny"), None),
    ("expert choice per sample", TINY_EC, None),
    ("groups of 3 samples", TINY_EC.replace(routing_pool="group", routing_group_size=48), None),
    ("the whole model call", TINY_EC.replace(routing_pool="batch"), None),
    ("capacity predictor threshold", TINY_EC.replace(capacity_predictor=True), 0.5),
])
def test_pool_statistics_for_every_pool_kind(name, config, threshold):
    """Tokens per expert per pool and experts per token per sample equal a numpy recount; expert choice's
    training routing gives every expert exactly C(pool) tokens of every pool; per-sample pools give every sample
    the same compute, group and batch pools spread it over the samples of a pool."""
    _, stats, seen = sample_and_record(config, [torch.tensor([0, 1, 2, 3, 3])], threshold=threshold)
    pools, samples = pool_extremes(seen, config)
    np.testing.assert_array_equal(np.stack([stats.pool_expert_min, stats.pool_expert_max], 1), pools)
    np.testing.assert_allclose(np.stack([stats.sample_experts_min, stats.sample_experts_max], 1), samples)
    summary = stats.summary()
    sizes = pool_sizes(config.routing_pool, config.routing_group_size, 10, 16)  # CFG: 10 samples per call
    assert summary["pools"] == STEPS * len(sizes) and summary["routing_pool"] == config.routing_pool
    assert summary["pool_tokens"] == sorted(set(sizes))
    layer = summary["layers"][0]
    if config.routing == "expert_choice" and threshold is None:
        capacities = [expert_capacity(config.capacity_factor, size, 4) for size in sizes]
        assert layer["tokens_per_expert_per_pool"]["min"] == min(capacities)
        assert layer["tokens_per_expert_per_pool"]["max"] == max(capacities)
        spread = layer["experts_per_token_per_sample"]["max"] - layer["experts_per_token_per_sample"]["min"]
        assert (spread == 0) == (config.routing_pool == "sample")
    else:  # the pool does not bound what an expert takes
        assert layer["tokens_per_expert_per_pool"]["min"] < layer["tokens_per_expert_per_pool"]["max"]

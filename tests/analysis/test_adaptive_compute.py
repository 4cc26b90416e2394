"""EC-DiT's adaptive compute: the experts-per-token counts the recorder keeps while a text model samples are
exactly the routers' choices, and their maps are drawn over the samples."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe.analysis import RoutingRecorder
from ditmoe.analysis.adaptive_compute import (
    AdaptiveCompute,
    ExpertsPerTokenRecorder,
    pick_steps,
    record_adaptive_compute,
)
from ditmoe.analysis.adaptive_compute_plots import (
    ALPHA,
    BASE_RANGE,
    HEADER_LINES,
    LABEL_WIDTH,
    LEGEND_HEIGHT,
    LINE,
    PAD,
    TITLE_LINES,
    heat_colors,
    overlay,
    save_adaptive_compute_maps,
)
from ditmoe.diffusion import build_objective
from ditmoe.model import DiT, get_preset
from ditmoe.model.conditioning import Caption
from ditmoe.model.routing import expert_capacity
from ditmoe.sampling import generate

STEPS = 3
# EC-DiT-tiny with 4 blocks: MoE in blocks 1 and 3; 4x4 tokens of a 4-channel 8x8 latent, 4 experts, C = 8
EC_TINY = get_preset("EC-DiT-tiny").replace(depth=4)
# capacity factor 1 (C = 4): at random initialisation some tokens get no expert (at 2 hardly any do, since
# each token's router probabilities sum to one)
EC_TINY_C4 = EC_TINY.replace(capacity_factor=1.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: no spinning against other processes


def ddpm(config=EC_TINY):
    return build_objective("ddpm", learn_sigma=config.learn_sigma)


def random_captions(n: int, config=EC_TINY, seed: int = 0) -> Caption:
    """N random captions of text_len tokens, the first 1..text_len real (right padding, zero embeddings)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, config.text_len + 1, (n,), generator=g)
    mask = torch.arange(config.text_len)[None] < lengths[:, None]
    tokens = torch.randn(n, config.text_len, config.text_dim, generator=g) * mask[..., None]
    return Caption(tokens, mask)


def text_model(config=EC_TINY) -> DiT:
    torch.manual_seed(0)
    model = DiT(config).eval()
    with torch.no_grad():  # random cross-attention and adaLN, so captions and steps change the routing
        for block in model.blocks:
            torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.3)
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    return model


@pytest.mark.parametrize("config, c", [(EC_TINY, 8), (EC_TINY_C4, 4)])
@pytest.mark.slow
def test_counts_obey_the_capacity_with_and_without_guidance(config, c):
    """Every expert takes C tokens per sample: per sample, layer and step the counts sum to E·C exactly."""
    model, objective = text_model(config), ddpm()
    captions = random_captions(5)
    for cfg_scale, batch_size in ((1.0, 5), (1.5, 2)):  # one run; three runs of 2, 2, 1 samples
        ac, samples = record_adaptive_compute(model, objective, captions, cfg_scale=cfg_scale, sampler="ddim",
                                              steps=STEPS, batch_size=batch_size, seed=4)
        assert expert_capacity(config.capacity_factor, config.num_tokens, config.num_experts) == c
        assert ac.capacity == c and ac.assignments_per_sample == 4 * c and ac.routing == "expert_choice"
        assert ac.experts_per_token.shape == (STEPS, 2, 5, 4, 4)
        assert np.issubdtype(ac.experts_per_token.dtype, np.integer)
        assert ac.layer_blocks.tolist() == [1, 3]
        spaced = ddpm().respace(f"ddim{STEPS}")
        assert ac.step_timesteps.tolist() == spaced.timestep_map[::-1].tolist()
        assert (ac.experts_per_token.sum(axis=(3, 4)) == 4 * c).all()
        assert ac.experts_per_token.min() >= 0 and ac.experts_per_token.max() <= 4
        if cfg_scale == 1.0:
            assert ac.experts_per_token_null.shape == (STEPS, 2, 0, 4, 4)
            assert "unprocessed_fraction_null" not in ac.summary()
        else:
            assert ac.experts_per_token_null.shape == (STEPS, 2, 5, 4, 4)
            assert (ac.experts_per_token_null.sum(axis=(3, 4)) == 4 * c).all()
            assert not np.array_equal(ac.experts_per_token, ac.experts_per_token_null)
        # adaptive: tokens get 0..E experts, and which ones changes with the step and the caption
        assert len(np.unique(ac.experts_per_token)) >= 3
        if c == 4:
            assert (ac.experts_per_token == 0).any()
        assert not (ac.experts_per_token == ac.experts_per_token[:1]).all()
        assert not (ac.experts_per_token == ac.experts_per_token[:, :, :1]).all()
        # recording changes nothing: the samples are generate's, batch b seeded by seed + b
        expected = generate(model, objective, captions, cfg_scale=cfg_scale, sampler="ddim", steps=STEPS,
                            batch_size=batch_size, seed=4)
        torch.testing.assert_close(samples, expected, rtol=0, atol=0)


def test_batch_pool_spreads_compute_over_the_samples():
    """With DiffMoE's batch pool the E·C(pool) assignments of a model call are shared unevenly by its samples:
    no fixed per-sample capacity is reported, and the per-sample range shows the spread (per-sample pools: none)."""
    model, objective = text_model(EC_TINY.replace(routing_pool="batch")), ddpm()
    ac, _ = record_adaptive_compute(model, objective, random_captions(4), sampler="ddim", steps=STEPS, seed=0)
    assert (ac.capacity, ac.assignments_per_sample) == (0, 0)
    total = expert_capacity(EC_TINY.capacity_factor, 4 * EC_TINY.num_tokens, EC_TINY.num_experts) * 4
    assert (ac.experts_per_token.sum(axis=(2, 3, 4)) == total).all()  # per step and layer: E·C of the pool
    spread = ac.summary()["layers"][0]["experts_per_token_per_sample"]
    assert spread["min"] < spread["max"]
    per_sample, _ = record_adaptive_compute(text_model(EC_TINY), objective, random_captions(4), sampler="ddim",
                                            steps=STEPS, seed=0)
    spread = per_sample.summary()["layers"][0]["experts_per_token_per_sample"]
    assert spread["min"] == spread["max"] == 4 * per_sample.capacity / EC_TINY.num_tokens


def test_count_map_equals_recomputation_from_router_scores():
    """At one sampling step, the count map is each expert's top-C tokens of its softmax router scores, counted."""
    model, objective = text_model(EC_TINY_C4), ddpm()
    n, step = 3, 1
    logits = {}  # layer -> (2n, T, E) gate output at the chosen step
    calls = {"step": -1}

    def on_call(module, args):
        calls["step"] += 1

    def on_gate(layer, module, args, output):
        if calls["step"] == step:
            logits[layer] = output.detach().clone()

    model.register_forward_pre_hook(on_call)
    for i, layer in enumerate(model.moe_layers()):
        layer.gate.register_forward_hook(lambda m, a, o, i=i: on_gate(i, m, a, o))
    ac, _ = record_adaptive_compute(model, objective, random_captions(n, seed=1), cfg_scale=2.0, sampler="ddim",
                                    steps=STEPS, seed=0)
    c, t, e = ac.capacity, EC_TINY.num_tokens, EC_TINY.num_experts
    assert sorted(logits) == [0, 1] and c == 4 and (ac.experts_per_token[step] == 0).any()
    for layer, scores in logits.items():
        probs = scores.float().softmax(dim=-1)  # (2n, T, E)
        expected = np.zeros((2 * n, t), np.int64)
        for sample in range(2 * n):
            for expert in range(e):
                chosen = probs[sample, :, expert].topk(c).indices.numpy()
                expected[sample, chosen] += 1
        expected = expected.reshape(2 * n, 4, 4)
        np.testing.assert_array_equal(ac.experts_per_token[step, layer], expected[:n])  # the conditional half
        np.testing.assert_array_equal(ac.experts_per_token_null[step, layer], expected[n:])  # the null caption's


def test_unprocessed_fraction_and_summary():
    model = text_model(EC_TINY_C4)
    ac, _ = record_adaptive_compute(model, ddpm(), random_captions(4), sampler="ddim",
                                    steps=STEPS)
    counts = ac.experts_per_token
    fraction = ac.unprocessed_fraction()
    assert fraction.shape == (STEPS, 2)
    for s in range(STEPS):
        for layer in range(2):
            assert fraction[s, layer] == (counts[s, layer] == 0).mean()
    assert fraction.max() > 0  # some tokens are left to the residual path alone
    np.testing.assert_array_equal(ac.unprocessed_fraction_per_sample(), (counts == 0).mean(axis=(3, 4)))
    coverage = ac.coverage()  # (S, L, E+1)
    np.testing.assert_allclose(coverage.sum(axis=2), 1.0)
    np.testing.assert_allclose(coverage[..., 0], fraction)
    np.testing.assert_allclose((coverage * np.arange(5)).sum(axis=2), 1.0)  # E·C / T = 4·4 / 16 experts per token
    groups = [("even", np.array([0, 2])), ("odd", np.array([1, 3]))]
    summary = ac.summary(groups)
    assert summary["unprocessed_fraction"] == [[round(float(v), 6) for v in row] for row in fraction]
    assert summary["layer_blocks"] == [1, 3] and summary["num_samples"] == 4 and summary["capacity"] == 4
    for i, layer in enumerate(summary["layers"]):
        assert layer["unprocessed_fraction_mean"] == pytest.approx(fraction[:, i].mean(), abs=1e-6)
        assert layer["experts_per_token_mean"] == 1.0
    even = (counts[:, :, [0, 2]] == 0).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(summary["groups"][0]["unprocessed_fraction"], even, atol=1e-6)
    assert summary["groups"][1]["samples"] == [1, 3]
    table = ac.format_table()
    assert "block 1" in table and "block 3" in table and f"{fraction[0, 0]:.4f}" in table
    assert len(table.splitlines()) == 1 + 1 + STEPS + 1  # title, header, steps, mean


def test_npz_round_trip(tmp_path):
    ac, _ = record_adaptive_compute(text_model(), ddpm(), random_captions(2), cfg_scale=1.5,
                                    sampler="ddim", steps=STEPS)
    ac.save_npz(tmp_path / "a.npz", prompts=np.array(["x", "y"]))
    loaded = AdaptiveCompute.load_npz(tmp_path / "a.npz")
    for name in ("experts_per_token", "experts_per_token_null", "step_timesteps", "layer_blocks"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(ac, name))
    assert (loaded.routing, loaded.num_experts, loaded.capacity) == ("expert_choice", 4, 8)
    with np.load(tmp_path / "a.npz") as data:
        np.testing.assert_array_equal(data["unprocessed_fraction"], ac.unprocessed_fraction())
        assert data["prompts"].tolist() == ["x", "y"]


def test_class_conditional_models_agree_with_the_routing_recorder():
    """With labels: expert choice's counts match RoutingRecorder's coverage; token choice gives top_k everywhere."""
    labels = torch.tensor([0, 3, 3, 9])
    for preset in ("tiny-ec", "tiny"):
        torch.manual_seed(0)
        model = DiT(get_preset(preset)).eval()
        objective = ddpm(model.config)
        with RoutingRecorder(model) as recorder:
            recorder.start_run()
            ac, _ = record_adaptive_compute(model, objective, labels, cfg_scale=1.5, sampler="ddim", steps=STEPS)
        stats = recorder.stats()
        both = np.concatenate([ac.experts_per_token, ac.experts_per_token_null], axis=2)  # (S, L, 2N, g, g)
        hist = np.stack([[np.bincount(both[s, i].ravel(), minlength=5) for i in range(2)] for s in range(STEPS)])
        np.testing.assert_array_equal(hist.transpose(1, 0, 2), stats.coverage)
        if preset == "tiny":
            assert ac.capacity == 0 and ac.assignments_per_sample == 2 * 16
            assert (ac.experts_per_token == 2).all() and (ac.unprocessed_fraction() == 0).all()


def test_recorder_rejects_bad_runs():
    model, objective = text_model(), ddpm()
    captions = random_captions(2)
    with ExpertsPerTokenRecorder(model) as recorder:
        with pytest.raises(RuntimeError, match="call start_run"):
            generate(model, objective, captions, sampler="ddim", steps=2)
        recorder.start_run(3)
        with pytest.raises(ValueError, match="a model call on 2 samples in a run of 3"):
            generate(model, objective, captions, sampler="ddim", steps=2)
    with ExpertsPerTokenRecorder(model) as recorder:
        recorder.start_run(2)
        generate(model, objective, captions, sampler="ddim", steps=3)
        recorder.start_run(2)
        with pytest.raises(ValueError, match="step 0 has timestep 750 but 668 in the first run"):
            generate(model, objective, captions, sampler="ddim", steps=4)
    with ExpertsPerTokenRecorder(model) as recorder:
        recorder.start_run(2)
        with pytest.raises(ValueError, match="sampler run 0 made no model call"):
            recorder.result()
    assert not model._forward_pre_hooks and all(not m._routing_hooks for m in model.moe_layers())
    with pytest.raises(ValueError, match="no MoE layers"):
        ExpertsPerTokenRecorder(DiT(EC_TINY.replace(num_experts=0)))


def test_pick_steps():
    assert pick_steps(3, 5) == [0, 1, 2]
    assert pick_steps(50, 5) == [0, 12, 24, 37, 49]
    assert pick_steps(10, 1) == [0]


def test_overlay_blends_the_upsampled_count_map():
    image = np.zeros((8, 8, 1), np.uint8)
    image[:, 4:] = 255  # right half white
    counts = np.array([[0, 4], [2, 1]])  # 2x2 tokens of 4x4 pixels
    out = overlay(image, counts, vmax=4)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    colours = heat_colors(counts, 4).astype(np.float64)
    black, white = BASE_RANGE  # the image squeezed into BASE_RANGE under the map

    def blend(base, colour):
        return np.broadcast_to(((1 - ALPHA) * base + ALPHA * colour).round(), (4, 4, 3))

    np.testing.assert_array_equal(out[:4, :4], blend(black, colours[0, 0]))
    np.testing.assert_array_equal(out[4:, :4], blend(black, colours[1, 0]))
    np.testing.assert_array_equal(out[:4, 4:], blend(white, colours[0, 1]))
    np.testing.assert_array_equal(out[4:, 4:], blend(white, colours[1, 1]))
    assert len({tuple(heat_colors(v, 4)) for v in range(5)}) == 5
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # RGB kept (squeezed)
    np.testing.assert_allclose(overlay(rgb, counts, 4, alpha=0.0), black + rgb * ((white - black) / 255), atol=0.5)
    latent = np.stack([np.full((8, 8), v, np.uint8) for v in (0, 255, 255, 255)], axis=-1)  # 4 channels: the mean
    assert (overlay(latent, counts, 4, alpha=0.0) == round(black + 191 * (white - black) / 255)).all()
    with pytest.raises(ValueError, match="does not tile"):
        overlay(np.zeros((6, 6, 1), np.uint8), np.zeros((4, 4)), 4)


def test_maps_have_the_layout_size(tmp_path):
    ac, samples = record_adaptive_compute(text_model(), ddpm(), random_captions(4), sampler="ddim",
                                          steps=6)
    images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # 8x8x4
    groups = [("a prompt", np.array([0, 2])), ("another prompt " * 20, np.array([1, 3]))]
    paths = save_adaptive_compute_maps(ac, images, groups, tmp_path / "maps", "title", num_steps=4)
    assert [p.name for p in paths] == ["adaptive_compute_prompt0.png", "adaptive_compute_prompt1.png"]
    cell = 96  # 8 pixels upscaled x12 to >= 96
    columns = 1 + 4 + 1  # the sample, 4 steps, their mean
    width = LABEL_WIDTH + columns * (cell + PAD) + PAD
    height = PAD + (TITLE_LINES + HEADER_LINES) * LINE + 2 * (cell + LINE + PAD) + LEGEND_HEIGHT + PAD
    for path in paths:
        image = Image.open(path)
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (width, height)
        pixels = np.asarray(image).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # blended maps, the colour bar, text

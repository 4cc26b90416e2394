"""tools/analyze_routing.py end to end on tiny digits checkpoints: token choice, expert choice, errors, and the
adaptive compute of a text-conditioned (EC-DiT) model.

The token-choice run is the shared ``trained_digits_run`` (the demo preset at the tiny preset's sizes:
hidden 32, depth 2, 4 experts top-2, one channel). Routing has no parameters of its own, so the
expert-choice variant is that checkpoint's EMA weights with ``routing="expert_choice"`` in its meta.
The text run trains the demo-t2i preset (EC-DiT's choices on captioned digits) for 2 steps at hidden 32,
depth 4 (MoE in blocks 1 and 3).
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe.analysis.adaptive_compute_plots import HEADER_LINES, LABEL_WIDTH, LEGEND_HEIGHT, LINE, PAD, TITLE_LINES
from ditmoe.checkpoint import resolve_checkpoint
from ditmoe.model import DiT, DiTConfig
from ditmoe.text import build_tiny_text_encoder

from conftest import load_tool, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

PNGS = {"overview.png", *(f"block{b}_{kind}.png" for b in (0, 1) for kind in ("class", "step", "position"))}


def variant_checkpoint(run, dst, **changes):
    """A tag directory holding ``run``'s EMA weights and meta with ``changes`` to the model config;
    a dense variant gets freshly initialised dense weights."""
    src = resolve_checkpoint(run)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*states.pt"))
    meta = json.loads((dst / "meta.json").read_text())
    meta["model_config"].update(changes)
    (dst / "meta.json").write_text(json.dumps(meta))
    if changes.get("num_experts") == 0:
        torch.save(DiT(DiTConfig.from_dict(meta["model_config"])).state_dict(), dst / "ema.pt")
    return dst


def analyze(ckpt, out, *extra):
    return run_cli(["tools/analyze_routing.py", "--ckpt", str(ckpt), "--out", str(out), "--sampler", "ddim",
                    "--steps", "4", *extra], env={"OMP_NUM_THREADS": "1"})


def assert_pngs_readable(out):
    assert {p.name for p in out.glob("*.png")} == PNGS
    for name in PNGS:
        image = np.asarray(Image.open(out / name).convert("RGB"))
        assert image.shape[0] > 200 and image.shape[1] > 500
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # heatmap colours, text, colorbar


def test_analyze_routing_token_choice(trained_digits_run, tmp_path):
    out = tmp_path / "routing"
    proc = analyze(trained_digits_run, out, "--samples-per-class", "2", "--cfg-scale", "1.5", "--batch-size", "8")
    assert f"wrote {out / 'overview.png'}" in proc.stdout
    data = np.load(out / "routing_stats.npz")
    # 2 MoE layers, 10 classes + null, 16 patches, 4 steps, 4 experts; 20 samples doubled by guidance
    assert data["by_class"].shape == (2, 11, 4) and data["by_position"].shape == (2, 16, 4)
    assert data["by_step"].shape == (2, 4, 4) and data["coverage"].shape == (2, 4, 5)
    assert (data["by_step"].sum(axis=2) == 40 * 16 * 2).all()  # every token picks top_k = 2 experts
    for name in ("by_class", "by_position", "by_step"):
        np.testing.assert_array_equal(data[name].sum(axis=1), data["total"])
    assert data["tokens_by_class"].tolist() == [2 * 4 * 16] * 10 + [20 * 4 * 16]
    assert data["step_timesteps"].tolist() == [750, 500, 250, 0]
    summary = json.loads((out / "routing_stats.json").read_text())
    assert summary["settings"]["sampler"] == "ddim" and summary["settings"]["samples_per_class"] == 2
    assert summary["routing"] == "token_choice" and [layer["block"] for layer in summary["layers"]] == [0, 1]
    for layer in summary["layers"]:
        assert sum(layer["expert_load"]) == pytest.approx(1.0, abs=4 * 5e-7)  # 4 loads, each rounded to 6 decimals
        assert layer["experts_per_token"] == 2.0 and layer["coverage"] == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert 0 <= layer["most_class_specialised"]["expert"] < 4
    assert_pngs_readable(out)


def test_analyze_routing_expert_choice(trained_digits_run, tmp_path):
    ckpt = variant_checkpoint(trained_digits_run, tmp_path / "ec", routing="expert_choice")
    out = tmp_path / "routing"
    analyze(ckpt, out, "--samples-per-class", "1")
    data = np.load(out / "routing_stats.npz")
    capacity = 8  # ceil(2.0 * 16 tokens / 4 experts)
    assert (data["by_class"][:, :10] == 4 * capacity).all() and (data["by_class"][:, 10] == 0).all()
    assert (data["coverage"].sum(axis=2) == 10 * 16).all()
    assert data["coverage"][..., [0, 1, 3, 4]].sum() > 0  # tokens get 0..4 experts, not always 2
    summary = json.loads((out / "routing_stats.json").read_text())
    assert summary["routing"] == "expert_choice"
    assert all(layer["experts_per_token"] == 2.0 for layer in summary["layers"])
    assert_pngs_readable(out)


@pytest.mark.parametrize("args, code, message", [
    (["--samples-per-class", "0"], 2, "error: --samples-per-class must be positive, got 0"),
    (["--samples-per-class", "1", "--steps", "-2"], 2, "error: --steps must be positive, got -2"),
    (["--samples-per-class", "1", "--sampler", "plms"], "error", "sampler='plms'"),
])
def test_analyze_routing_bad_arguments(trained_digits_run, tmp_path, capsys, args, code, message):
    """Usage errors exit 2 with the message on stderr; runtime errors exit with ``error: MESSAGE``."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool("analyze_routing").main(["--ckpt", str(trained_digits_run), "--out", str(tmp_path), *args])
    if code == 2:
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    else:
        assert re.search(message, str(exit_info.value))


def test_analyze_routing_missing_and_dense_checkpoints(trained_digits_run, tmp_path):
    tool = load_tool("analyze_routing")
    with pytest.raises(SystemExit, match="none: no such file or directory"):
        tool.main(["--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--samples-per-class", "1"])
    dense = variant_checkpoint(trained_digits_run, tmp_path / "dense", num_experts=0)
    with pytest.raises(SystemExit, match="is a dense model \\(num_experts=0\\): no MoE layers to analyse"):
        tool.main(["--ckpt", str(dense), "--out", str(tmp_path / "o"), "--samples-per-class", "1"])
    assert not (tmp_path / "o").exists()


T2I = ["--preset", "demo-t2i", "--global-batch-size", "16", "--set", "model.hidden_size=32",
       "--set", "model.depth=4", "--set", "model.num_heads=2", "--set", "log_every=1", "--set", "eval_samples=0",
       "--set", "eval_every=0", "--set", "sample_every=0"]


@pytest.fixture(scope="module")
def trained_t2i_run(tmp_path_factory):
    """A 2-step text-to-image digits run (its tiny CLIP text encoder recorded in the checkpoint's meta)."""
    out = tmp_path_factory.mktemp("t2i_run")
    run_cli(["-m", "ditmoe.train", *T2I, "--steps", "2", "--out", str(out)], env={"OMP_NUM_THREADS": "1"})
    return out


def without_text_encoder(run, dst, **train_config):
    """``run``'s checkpoint with no text encoder in its meta, and ``train_config`` entries added."""
    dst = variant_checkpoint(run, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.pop("text_encoder")
    meta["train_config"].update(train_config)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_analyze_routing_adaptive_compute(trained_t2i_run, tmp_path):
    """Capacity factor 1 (C = 4 of 16 tokens per expert, a checkpoint variant): some tokens get no expert."""
    ckpt = variant_checkpoint(trained_t2i_run, tmp_path / "c4", capacity_factor=1.0)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a handwritten three\n\n")
    out = tmp_path / "ac"
    proc = analyze(ckpt, out, "--prompt", "the digit 7", "--prompts", str(prompts_file), "--samples-per-prompt", "2",
                   "--cfg-scale", "1.5", "--batch-size", "3", "--map-steps", "3")
    data = np.load(out / "adaptive_compute.npz")
    counts = data["experts_per_token"]
    assert counts.shape == (4, 2, 4, 4, 4) and np.issubdtype(counts.dtype, np.integer)  # steps, layers, N, 4x4
    assert data["experts_per_token_null"].shape == (4, 2, 4, 4, 4)  # guidance's null-caption half
    assert (counts.sum(axis=(3, 4)) == 4 * 4).all() and (data["experts_per_token_null"].sum(axis=(3, 4)) == 16).all()
    assert data["layer_blocks"].tolist() == [1, 3] and data["step_timesteps"].tolist() == [750, 500, 250, 0]
    assert data["prompts"].tolist() == ["the digit 7", "a handwritten three"]
    assert data["prompt_index"].tolist() == [0, 1, 0, 1] and data["samples"].shape == (4, 8, 8, 1)
    fraction = (counts == 0).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(data["unprocessed_fraction"], fraction)
    assert fraction.max() > 0
    summary = json.loads((out / "adaptive_compute.json").read_text())
    np.testing.assert_allclose(summary["unprocessed_fraction"], fraction, atol=1e-6)
    assert summary["routing"] == "expert_choice" and summary["capacity"] == 4 and summary["num_experts"] == 4
    assert summary["settings"]["text_encoder"] == {"name": str(trained_t2i_run / "data" / "text_encoder"),
                                                   "max_length": 8}
    assert [g["samples"] for g in summary["groups"]] == [[0, 2], [1, 3]]
    np.testing.assert_allclose(summary["groups"][1]["unprocessed_fraction"],
                               (counts[:, :, [1, 3]] == 0).mean(axis=(2, 3, 4)), atol=1e-6)
    assert "share of image tokens processed by no expert" in proc.stdout
    assert f"{fraction[0, 1]:.4f}" in proc.stdout and f"{fraction.mean(axis=0)[0]:.4f}" in proc.stdout
    width = LABEL_WIDTH + (1 + 3 + 1) * (96 + PAD) + PAD  # the sample, 3 steps, their mean; 8 px upscaled x12
    height = PAD + (TITLE_LINES + HEADER_LINES) * LINE + 2 * (96 + LINE + PAD) + LEGEND_HEIGHT + PAD
    for p in range(2):
        png = out / f"adaptive_compute_prompt{p}.png"
        assert f"wrote {png}" in proc.stdout
        image = Image.open(png)
        assert image.size == (width, height) and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 50
    assert {p.name for p in out.iterdir()} == {"adaptive_compute.npz", "adaptive_compute.json",
                                              "adaptive_compute_prompt0.png", "adaptive_compute_prompt1.png"}


def test_analyze_routing_text_encoder_from_train_config(trained_t2i_run, tmp_path, capsys):
    """Without meta's text_encoder, train_config's text_encoder / text_max_length keys name it."""
    ckpt = without_text_encoder(trained_t2i_run, tmp_path / "ckpt", text_max_length=6,
                                text_encoder=str(trained_t2i_run / "data" / "text_encoder"))
    load_tool("analyze_routing").main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--prompt", "seven",
                                       "--sampler", "ddim", "--steps", "2"])
    summary = json.loads((tmp_path / "o" / "adaptive_compute.json").read_text())
    assert summary["settings"]["text_encoder"]["max_length"] == 6
    assert len(summary["unprocessed_fraction"]) == 2 and len(summary["unprocessed_fraction"][0]) == 2
    assert "wrote" in capsys.readouterr().out


def test_analyze_routing_text_model_errors(trained_t2i_run, trained_digits_run, tmp_path):
    tool = load_tool("analyze_routing")
    out = tmp_path / "o"

    def fails(ckpt, *args, match):
        with pytest.raises(SystemExit, match=match):
            tool.main(["--ckpt", str(ckpt), "--out", str(out), "--sampler", "ddim", "--steps", "2", *args])

    fails(trained_t2i_run, match="a text-conditioned model needs prompts")
    fails(trained_t2i_run, "--prompt", "7", "--samples-per-class", "1", match="not --samples-per-class")
    fails(without_text_encoder(trained_t2i_run, tmp_path / "bare"), "--prompt", "7",
          match="records no text encoder .*: pass --text-encoder")
    narrow = build_tiny_text_encoder(tmp_path / "t5", "t5", width=8)
    fails(trained_t2i_run, "--prompt", "7", "--text-encoder", str(narrow),
          match="gives 8-wide token embeddings, the model expects text_dim=16")
    fails(trained_t2i_run, "--prompt", "7", "--text-encoder", str(tmp_path / "none"), match="no such directory")
    fails(trained_digits_run, "--prompt", "7", "--samples-per-class", "1",
          match="class-conditional model: it takes no prompts")
    fails(trained_digits_run, match="class-conditional model: pass --samples-per-class N")
    assert not out.exists()

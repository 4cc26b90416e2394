"""tools/analyze_routing.py end to end on a tiny digits checkpoint: token choice, expert choice, errors.

The token-choice run is the shared ``trained_digits_run`` (the demo preset at the tiny preset's sizes:
hidden 32, depth 2, 4 experts top-2, one channel). Routing has no parameters of its own, so the
expert-choice variant is that checkpoint's EMA weights with ``routing="expert_choice"`` in its meta.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe.checkpoint import resolve_checkpoint
from ditmoe.model import DiT, DiTConfig

from conftest import load_tool, run_cli

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

"""tools/convert_ckpt_to_hf.py on real training checkpoints: the folder loads offline through
``transformers.AutoModel`` (remote code, in a process that cannot import ditmoe) and gives exactly
the training model's output; weights are read from every checkpoint layout."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ditmoe.inference import load_model
from ditmoe.model.card import count_parameters

from conftest import load_tool, run_cli, torchrun

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

TOOL = "tools/convert_ckpt_to_hf.py"
# Loads the folder with transformers only: cwd and sys.path exclude the repository.
AUTOMODEL_SCRIPT = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x, t, y = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(x.to(model.dtype), t, y)
torch.save((type(model).__name__, str(model.dtype), out.float()), sys.argv[3])
"""


def automodel_output(folder, inputs, tmp_path):
    """(class name, dtype, output) of AutoModel.from_pretrained(folder) in a clean, offline process."""
    script, result = tmp_path / "load.py", tmp_path / "out.pt"
    script.write_text(AUTOMODEL_SCRIPT)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "inputs.pt"), str(result)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def digits_inputs(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % 11


def test_export_loads_offline_with_automodel_and_matches_exactly(trained_digits_run, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli([TOOL, "--ckpt", str(trained_digits_run), "--out", str(out), "--max-shard-size", "40KB"])
    model, meta = load_model(trained_digits_run, weights="ema")
    params = count_parameters(model.config)
    assert f"{params['total'] / 1e6:.3f}M parameters total, {params['activated'] / 1e6:.3f}M activated" in proc.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert sorted(index["weight_map"]) == sorted(f"dit.{k}" for k in model.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ditmoe" and config["auto_map"]["AutoModel"] == "modeling_ditmoe.DiTMoEModel"
    assert (config["num_experts"], config["num_experts_per_tok"], config["routing"], config["moe_placement"]) == (
        4, 2, "token_choice", "all")
    assert (config["expert_hidden_size"], config["shared_expert_hidden_size"]) == (128, 64)
    assert config["balance_loss_alpha"] == 0.005 and config["learn_sigma"] is True
    schedule = json.loads((out / "scheduler_config.json").read_text())
    assert schedule["objective"] == meta["train_config"]["objective"] == "ddpm"
    assert schedule["variance_type"] == "learned_range" and schedule["beta_end"] == 0.02
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag:" in card and f"{params['total'] / 1e6:.2f} M total" in card

    inputs = digits_inputs()
    name, dtype, hf_out = automodel_output(out, inputs, tmp_path)
    with torch.no_grad():
        reference = model(*inputs)
    assert name == "DiTMoEModel" and dtype == "torch.float32"
    assert torch.equal(hf_out, reference)


def test_bf16_export_and_sampling_from_the_folder(trained_digits_run, tmp_path):
    out = tmp_path / "hf16"
    run_cli([TOOL, "--ckpt", str(trained_digits_run), "--out", str(out), "--dtype", "bf16"])
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, _ = load_model(trained_digits_run)
    inputs = digits_inputs()
    _, dtype, hf_out = automodel_output(out, inputs, tmp_path)
    with torch.no_grad():
        reference = model(*inputs)
    assert dtype == "torch.bfloat16"
    assert (hf_out - reference).abs().max() < 0.05 * reference.abs().max()
    samples = tmp_path / "s.npz"
    run_cli(["tools/sample.py", "--ckpt", str(out), "--out", str(samples), "--num-samples", "4", "--steps", "5",
             "--sampler", "ddim"])
    assert samples.is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_trained_weights_from_ep_checkpoints_equal_the_gathered_ema(tmp_path, stage):
    """With ema_decay 0 the EMA is the weights, gathered by ditmoe; --weights model reads them
    independently through DeepSpeed's universal checkpoint (ZeRO-3 partitions, AutoEP shards)."""
    run = tmp_path / "run"
    torchrun(run, "--zero-stage", str(stage), "--ep-size", "2", "--set", "ema_decay=0.0", "--steps", "2")
    outs = {}
    for weights in ("model", "ema"):
        outs[weights] = tmp_path / weights
        run_cli([TOOL, "--ckpt", str(run), "--weights", weights, "--out", str(outs[weights])])
    model_weights, _ = load_model(outs["model"])
    ema_weights, _ = load_model(outs["ema"])
    for (name, a), b in zip(model_weights.state_dict().items(), ema_weights.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert any(model_weights.state_dict()[k].abs().sum() > 0 for k in model_weights.state_dict() if "experts" in k)


def test_single_process_model_weights(trained_digits_run, tmp_path):
    run_cli([TOOL, "--ckpt", str(trained_digits_run), "--weights", "model", "--tag", "step_00000004",
             "--out", str(tmp_path / "m")])
    exported, _ = load_model(tmp_path / "m")
    saved = torch.load(trained_digits_run / "checkpoints/step_00000004/mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    for name, value in exported.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(value, saved[name].float()), name


def converter_error(args) -> str:
    """The ``error: ...`` message the converter exits with (run in this process)."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool("convert_ckpt_to_hf").main(args)
    return str(exit_info.value.code)


def test_bad_checkpoints_are_clear_errors(trained_digits_run, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert "no such file or directory" in converter_error(["--ckpt", str(tmp_path / "nowhere"), *out])
    assert "no tag 'step_00000099'" in converter_error(["--ckpt", str(trained_digits_run), "--tag", "step_00000099",
                                                        *out])
    broken = tmp_path / "broken"
    shutil.copytree(trained_digits_run / "checkpoints/step_00000004", broken)
    (broken / "ema.pt").unlink()
    assert "missing ema.pt" in converter_error(["--ckpt", str(broken), *out])
    (broken / "mp_rank_00_model_states.pt").unlink()
    assert "missing mp_rank_00_model_states.pt" in converter_error(["--ckpt", str(broken), "--weights", "model", *out])
    assert not (tmp_path / "o").exists()

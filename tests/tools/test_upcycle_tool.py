"""``tools/upcycle.py``: a facebookresearch DiT .pt (a state dict built here with that repository's key names and
shapes, no download) or a ditmoe dense training checkpoint -> a DiT-MoE initialisation that
``load_init_weights`` reads, which computes the dense model's function right after upcycling (token choice,
renormalised top-k), every tensor accounted for; and the tool's errors."""

import json
import math

import numpy as np
import pytest
import torch

from ditmoe.checkpoint import load_full_ema, resolve_checkpoint
from ditmoe.hf.official import load_published
from ditmoe.inference import load_model
from ditmoe.model import DiT, DiTConfig
from ditmoe.train.config import apply_settings
from ditmoe.train.init_from import RECORD_FILE, WEIGHTS_FILE, load_init_weights

from conftest import SMALL_DIGITS, load_tool, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

# the tiny DiT the .pt holds: latent 8x8x4, patch 2, width 32, 3 blocks, MLP width 128, 10 classes, learned sigma
DEPTH, WIDTH, MLP, CLASSES, CHANNELS, PATCH, GRID = 3, 32, 128, 10, 4, 2, 4
# the exact target (expert_ratio stays 4.0 = mlp_ratio, the default)
EXACT = ["--set", "num_experts=4", "--set", "top_k=2", "--set", "norm_topk_prob=true",
         "--set", "model.expert_activation=gelu", "--set", "num_shared_experts=0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The CPU cores are shared."""


def mae_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table as facebookresearch/DiT stores it: (1, grid², dim)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    return torch.from_numpy(np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)[None]).float()


def facebook_dit_state(zero_mlp_biases: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in facebookresearch/DiT's layout (models.py: timm PatchEmbed, Attention, Mlp; norms
    without affine parameters; adaLN-Zero modulations), every tensor non-zero but the MLP biases if asked."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "x_embedder.proj.weight": (WIDTH, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": (WIDTH,),
        "t_embedder.mlp.0.weight": (WIDTH, 256), "t_embedder.mlp.0.bias": (WIDTH,),
        "t_embedder.mlp.2.weight": (WIDTH, WIDTH), "t_embedder.mlp.2.bias": (WIDTH,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, WIDTH),  # + the null class of classifier-free guidance
    }
    for i in range(DEPTH):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * WIDTH, WIDTH), f"blocks.{i}.attn.qkv.bias": (3 * WIDTH,),
            f"blocks.{i}.attn.proj.weight": (WIDTH, WIDTH), f"blocks.{i}.attn.proj.bias": (WIDTH,),
            f"blocks.{i}.mlp.fc1.weight": (MLP, WIDTH), f"blocks.{i}.mlp.fc1.bias": (MLP,),
            f"blocks.{i}.mlp.fc2.weight": (WIDTH, MLP), f"blocks.{i}.mlp.fc2.bias": (WIDTH,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * WIDTH, WIDTH),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * WIDTH,),
        })
    shapes.update({
        "final_layer.linear.weight": (PATCH * PATCH * 2 * CHANNELS, WIDTH),
        "final_layer.linear.bias": (PATCH * PATCH * 2 * CHANNELS,),
        "final_layer.adaLN_modulation.1.weight": (2 * WIDTH, WIDTH),
        "final_layer.adaLN_modulation.1.bias": (2 * WIDTH,),
    })
    state = {"pos_embed": mae_pos_embed(WIDTH, GRID)}
    for name, shape in shapes.items():
        zero = zero_mlp_biases and ".mlp.fc" in name and name.endswith(".bias")
        state[name] = torch.zeros(shape) if zero else 0.2 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("facebook") / "DiT-tiny.pt"
    torch.save(facebook_dit_state(), path)
    return path


@pytest.fixture(scope="module")
def biased_dit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("facebook_biased") / "DiT-tiny-biased.pt"
    torch.save(facebook_dit_state(zero_mlp_biases=False), path)
    return path


def upcycle_main(capsys, *argv) -> str:
    load_tool("upcycle").main([str(a) for a in argv])
    return capsys.readouterr().out


def runtime_error(*argv) -> str:
    """The ``error: MESSAGE`` the tool exits with (status 1)."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool("upcycle").main([str(a) for a in argv])
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_tool("upcycle").main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def inputs(config: DiTConfig, n: int = 3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=g)
    return x, torch.randint(0, 1000, (n,), generator=g), torch.randint(0, config.num_classes, (n,), generator=g)


@torch.no_grad()
def max_difference(dense: DiT, moe: DiT) -> float:
    x, t, y = inputs(dense.config)
    keep = torch.zeros(len(x), dtype=torch.bool)
    return (moe.eval()(x, t, y, keep) - dense.eval()(x, t, y, keep)).abs().max().item()


def init_model(folder) -> DiT:
    """The model the trainer's --init-from builds: the config the record names, the weights loaded strictly."""
    config = DiTConfig.from_dict(json.loads((folder / RECORD_FILE).read_text())["model_config"])
    model = DiT(config)
    model.load_state_dict(load_init_weights(folder, config))
    return model


def test_facebook_dit_upcycles_to_the_same_function(capsys, dit_file, tmp_path):
    out = upcycle_main(capsys, "--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "up",
                       *EXACT, "--verify")
    assert "exact: yes" in out and "max |MoE - dense| on random inputs" in out
    moe = init_model(tmp_path / "up")
    assert (moe.config.num_experts, moe.config.depth, moe.config.hidden_size) == (4, DEPTH, WIDTH)
    dense = load_published(dit_file, "dit", num_heads=2)  # ditmoe's own importer of the same file
    assert max_difference(dense, moe) < 1e-5
    silenced = DiT(moe.config)
    silenced.load_state_dict({k: torch.zeros_like(v) if k.endswith("down_proj") else v
                              for k, v in moe.state_dict().items()})
    assert max_difference(dense, silenced) > 1e-3  # the experts carry the MLPs: the check is not vacuous


def test_every_tensor_of_the_file_and_of_the_model_is_accounted_for(capsys, dit_file, tmp_path):
    out = upcycle_main(capsys, "--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "up",
                       *EXACT, "--set", "moe_placement=every_other", "--set", "num_shared_experts=1")
    record = json.loads((tmp_path / "up" / RECORD_FILE).read_text())
    source, target = record["counts"]["source"], record["counts"]["target"]
    file_tensors = len(torch.load(dit_file, weights_only=True))
    model_tensors = len(DiT(DiTConfig.from_dict(record["model_config"])).state_dict())
    assert sum(source.values()) == file_tensors == record["source"]["tensors"]
    assert sum(target.values()) == model_tensors
    assert source == {"copied": file_tensors - 1 - 4, "into experts": 2, "zero MLP bias": 2, "dropped MLP bias": 0,
                      "checked pos_embed": 1}  # block 1 is the only MoE block of 3
    assert target == {"copied": file_tensors - 1 - 4, "experts from the MLP": 2, "fresh router": 1,
                      "fresh shared experts": 2, "fresh capacity predictor": 0, "computed pos_embed": 1}
    assert f"source tensors: {file_tensors}" in out and f"target tensors: {model_tensors}" in out
    assert record["exact"] is True and record["notes"] == []
    assert record["source"]["kind"] == "dit" and record["scheme"]["router_std"] == 0.02


def test_printed_training_flags_give_the_upcycled_config(capsys, dit_file, tmp_path):
    out = upcycle_main(capsys, "--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "up", *EXACT)
    record = json.loads((tmp_path / "up" / RECORD_FILE).read_text())
    flags = record["train_flags"]
    assert f"python -m ditmoe.train {' '.join(flags)} --init-from {tmp_path / 'up'}" in out
    assert flags[0] == "--preset"
    sets = [flags[i + 1] for i in range(2, len(flags), 2)]
    config = apply_settings(({}, {}), {"preset": flags[1]}, sets).model_config()
    assert config.to_dict() == record["model_config"]


def test_noise_breaks_the_equality_but_keeps_the_shapes(capsys, dit_file, tmp_path):
    exact_dir, noisy_dir = tmp_path / "exact", tmp_path / "noisy"
    upcycle_main(capsys, "--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", exact_dir, *EXACT)
    out = upcycle_main(capsys, "--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", noisy_dir, *EXACT,
                       "--noise-std", "0.05", "--verify")
    assert "exact: no" in out and "noise_std=0.05" in out
    exact, noisy = init_model(exact_dir), init_model(noisy_dir)
    assert {k: v.shape for k, v in noisy.state_dict().items()} == {k: v.shape for k, v in exact.state_dict().items()}
    assert max_difference(exact, noisy) > 1e-4
    assert json.loads((noisy_dir / RECORD_FILE).read_text())["exact"] is False


def test_expert_choice_target_is_upcycled_with_a_note(capsys, dit_file, tmp_path):
    out = upcycle_main(capsys, "--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "ec",
                       *EXACT, "--set", "routing=expert_choice", "--set", "capacity_factor=2.0")
    assert "exact: no" in out and "note: expert choice routing" in out and "token choice only" in out
    record = json.loads((tmp_path / "ec" / RECORD_FILE).read_text())
    assert record["exact"] is False and "expert choice" in record["notes"][0]
    assert init_model(tmp_path / "ec").config.routing == "expert_choice"


def test_mlp_biases_are_refused_unless_dropped(capsys, biased_dit_file, tmp_path):
    message = runtime_error("--from", "dit", "--ckpt", biased_dit_file, "--num-heads", 2, "--out", tmp_path / "b",
                            *EXACT)
    assert "blocks.0.mlp.fc1.bias is not zero" in message and "--drop-mlp-biases" in message
    assert not (tmp_path / "b").exists()
    out = upcycle_main(capsys, "--from", "dit", "--ckpt", biased_dit_file, "--num-heads", 2, "--out", tmp_path / "b",
                       *EXACT, "--drop-mlp-biases")
    assert "exact: no" in out and "dropped MLP bias" in out
    record = json.loads((tmp_path / "b" / RECORD_FILE).read_text())
    assert record["counts"]["source"]["dropped MLP bias"] == 2 * DEPTH


# ------------------------------------------------------------------------------- ditmoe dense training checkpoint

@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense demo run (no experts) trained 2 steps, with its checkpoint."""
    out = tmp_path_factory.mktemp("dense_run")
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--set", "model.num_experts=0", "--steps", "2", "--out", str(out)])
    return out


def randomised_copy(run, folder, zero_mlp_biases: bool = True):
    """``run``'s checkpoint with its EMA weights made random, so that the comparison is not between the
    near-zero outputs of an adaLN-Zero model 2 steps old; the MLP biases zero (ditmoe's experts have none) or,
    with ``zero_mlp_biases=False``, random too (as in a longer-trained model)."""
    tag_dir = resolve_checkpoint(run)
    copy = folder / "checkpoints" / tag_dir.name
    copy.mkdir(parents=True)
    for file in tag_dir.iterdir():
        if file.is_file():
            (copy / file.name).write_bytes(file.read_bytes())
    (folder / "checkpoints" / "latest").write_text(tag_dir.name)
    g = torch.Generator().manual_seed(0)
    ema = {}
    for name, value in load_full_ema(tag_dir).items():
        if name == "pos_embed":
            ema[name] = value
        elif zero_mlp_biases and ".mlp.fc" in name and name.endswith(".bias"):
            ema[name] = torch.zeros_like(value)
        else:
            ema[name] = 0.2 * torch.randn(value.shape, generator=g)
    torch.save(ema, copy / "ema.pt")
    return folder


def test_ditmoe_dense_checkpoint_trained_2_steps_upcycles_to_the_same_function(capsys, dense_run, tmp_path):
    """EMA and trained weights as the run wrote them. (Two steps move no MLP weight of an adaLN-Zero DiT: the
    zero output layer, then the zero gates stop their gradients; the random copy below makes the check bite.)"""
    dense_ema, _ = load_model(dense_run)  # ditmoe's own loader of the dense checkpoint
    assert dense_ema.config.num_experts == 0
    for weights in ("ema", "model"):
        out = upcycle_main(capsys, "--ckpt", dense_run, "--weights", weights, "--out", tmp_path / weights, *EXACT)
        assert "exact: yes" in out and "--preset demo" in out
        record = json.loads((tmp_path / weights / RECORD_FILE).read_text())
        assert record["source"]["kind"] == "ditmoe" and record["source"]["step"] == 2
        assert record["source"]["weights"] == weights
        assert sum(record["counts"]["source"].values()) == record["source"]["tensors"]
        dense, _ = load_model(dense_run, weights=weights)
        assert max_difference(dense, init_model(tmp_path / weights)) < 1e-5


def test_ditmoe_dense_checkpoint_with_random_weights_upcycles_to_the_same_function(capsys, dense_run, tmp_path):
    run = randomised_copy(dense_run, tmp_path / "run")
    out = upcycle_main(capsys, "--ckpt", run, "--out", tmp_path / "up", *EXACT, "--verify")
    assert "exact: yes" in out
    dense, _ = load_model(run)
    moe = init_model(tmp_path / "up")
    assert max_difference(dense, moe) < 1e-5
    silenced = DiT(moe.config)
    silenced.load_state_dict({k: torch.zeros_like(v) if k.endswith("down_proj") else v
                              for k, v in moe.state_dict().items()})
    assert max_difference(dense, silenced) > 1e-3


def test_ditmoe_checkpoint_biases_are_refused_unless_dropped(capsys, dense_run, tmp_path):
    run = randomised_copy(dense_run, tmp_path / "run", zero_mlp_biases=False)
    message = runtime_error("--ckpt", run, "--out", tmp_path / "up", *EXACT)
    assert "blocks.0.mlp.fc1.bias is not zero" in message and "--drop-mlp-biases" in message
    out = upcycle_main(capsys, "--ckpt", run, "--out", tmp_path / "up", *EXACT, "--drop-mlp-biases", "--verify")
    assert "exact: no" in out and "note: drop_mlp_biases" in out
    record = json.loads((tmp_path / "up" / RECORD_FILE).read_text())
    config = DiTConfig.from_dict(record["model_config"])
    assert record["counts"]["source"]["dropped MLP bias"] == 2 * config.depth
    assert sum(record["counts"]["source"].values()) == record["source"]["tensors"]
    dense, _ = load_model(run)
    assert max_difference(dense, init_model(tmp_path / "up")) > 1e-4  # the biases mattered


# ------------------------------------------------------------------------------------------------------ errors

def test_missing_inputs_are_runtime_errors(dit_file, tmp_path):
    assert runtime_error("--from", "dit", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "o", *EXACT) == \
        f"error: checkpoint {tmp_path / 'none.pt'}: no such file"
    message = runtime_error("--ckpt", tmp_path / "no_run", "--out", tmp_path / "o", *EXACT)
    assert message.startswith(f"error: checkpoint {tmp_path / 'no_run'}: no such file or directory")
    assert "pass --from dit" in runtime_error("--ckpt", dit_file, "--out", tmp_path / "o", *EXACT)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert "is truncated or corrupt" in runtime_error("--from", "dit", "--ckpt", bad, "--out", tmp_path / "o", *EXACT)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    (["--set", "expert_activation=swiglu"], "SwiGLU expert cannot compute the dense GELU MLP"),
    (["--set", "expert_ratio=2.0"], "expert width 64 (expert_ratio=2.0) differs from the dense MLP's width 128"),
    (["--set", "num_experts=0"], "the target config is dense"),
    (["--set", "depth=2"], "depth: source 3 vs target 2"),
])
def test_incompatible_targets_are_runtime_errors(dit_file, tmp_path, change, message):
    error = runtime_error("--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "o", *EXACT,
                          *change)
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "o").exists()


def test_a_preset_of_another_width_is_refused(dit_file, tmp_path):
    error = runtime_error("--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "o",
                          "--preset", "DiT-MoE-S/2-8E2A", "--set", "expert_activation=gelu")
    assert "hidden_size: source 32 vs target 384" in error


def test_an_upcycled_folder_is_not_overwritten_silently(capsys, dit_file, tmp_path):
    args = ["--from", "dit", "--ckpt", dit_file, "--num-heads", 2, "--out", tmp_path / "o", *EXACT]
    upcycle_main(capsys, *args)
    assert "pass --overwrite" in runtime_error(*args)
    upcycle_main(capsys, *args, "--overwrite", "--seed", "1")
    assert json.loads((tmp_path / "o" / RECORD_FILE).read_text())["scheme"]["seed"] == 1
    assert (tmp_path / "o" / WEIGHTS_FILE).is_file()


@pytest.mark.parametrize("argv, flag", [
    (["--set", "bogus=1"], "--set"),
    (["--set", "top_k"], "--set"),
    (["--noise-std", "-1"], "--noise-std"),
    (["--router-std", "x"], "--router-std"),
    (["--tag", "step_00000002"], "--tag"),
    (["--preset", "nope"], "--preset"),
])
def test_usage_errors_name_the_flag(capsys, dit_file, tmp_path, argv, flag):
    err = usage_error(capsys, "--from", "dit", "--ckpt", dit_file, "--out", tmp_path / "o", *argv)
    assert flag in err


def test_help_states_the_rules_and_every_flag_has_help(capsys):
    parser = load_tool("upcycle").build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
    text = parser.format_help()
    for rule in ("GELU copies", "expert_ratio == mlp_ratio", "SwiGLU targets are refused", "N(0, --router-std)",
                 "norm_topk_prob=true", "--drop-mlp-biases", "--noise-std > 0", "expert choice", "accounted for",
                 "--init-from"):
        assert rule in text, rule
    assert math.isclose(load_tool("upcycle").VERIFY_ATOL, 1e-4)


def test_the_upcycled_model_trains_through_init_from_and_resumes(capsys, dense_run, tmp_path):
    """--init-from starts at step 0 from the upcycled weights (fresh optimizer), and the run resumes normally."""
    upcycle_main(capsys, "--ckpt", dense_run, "--out", tmp_path / "up", *EXACT)
    model_flags = [item for key in ("num_experts=4", "top_k=2", "norm_topk_prob=true", "expert_activation=gelu",
                                    "num_shared_experts=0") for item in ("--set", f"model.{key}")]
    train = ["-m", "ditmoe.train", *SMALL_DIGITS, *model_flags, "--set", "ckpt_every=2", "--seed", "4"]
    run_cli([*train, "--steps", "2", "--init-from", str(tmp_path / "up"), "--out", str(tmp_path / "run")])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and math.isfinite(first["loss"])
    run_cli([*train, "--steps", "1", "--out", str(tmp_path / "fresh")])  # the same run from random weights
    fresh = json.loads((tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()[0])
    assert fresh["loss"] != first["loss"]  # the upcycled weights were used
    resumed = run_cli([*train, "--steps", "4", "--resume", "auto", "--out", str(tmp_path / "run")])
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    proc = run_cli([*train, "--steps", "2", "--init-from", str(tmp_path / "up"), "--resume", "auto",
                    "--out", str(tmp_path / "other")], check=False)
    assert proc.returncode == 2 and "init_from and resume exclude each other" in proc.stderr
    mismatch = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1", "--init-from", str(tmp_path / "up"),
                        "--out", str(tmp_path / "bad")], check=False)
    assert mismatch.returncode == 1 and str(tmp_path / "up") in mismatch.stderr, mismatch.stderr

"""Bad input to the tools fails at once and clearly: a bad flag value is a usage error naming the flag (status 2),
a damaged input file a runtime error naming the file (status 1), before any work and before anything is written."""

import json

import numpy as np
import pytest
import torch

from ditmoe.model import build_model

from conftest import load_tool

IMAGES = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)


def usage_error(capsys, main, argv) -> str:
    """The stderr of ``main(argv)``, which must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def runtime_error(main, argv) -> str:
    """The ``error: MESSAGE`` line of ``main(argv)``, which must exit with it (status 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def images_npz(path, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, arr_0=IMAGES)
    return path


def damaged_data(path):
    """An npz whose arr_0 has one wrong byte in the middle of its images (header and zip structure intact)."""
    images_npz(path)
    flip_byte(path, path.read_bytes().find(b"\x93NUMPY") + 128 + IMAGES.size // 2)
    return path, "Bad CRC-32 for file 'arr_0.npy'"


def damaged_stream(path):
    """A compressed npz with one wrong byte in its deflate stream."""
    images_npz(path, compressed=True)
    flip_byte(path, len(path.read_bytes()) // 2)
    return path, ""


def damaged_member_name(path):
    """An npz whose local header names its member differently from its central directory."""
    images_npz(path)
    flip_byte(path, path.read_bytes().find(b"arr_0.npy") + 4)
    return path, "File name in directory 'arr_0.npy' and header"


DAMAGE = [damaged_data, damaged_stream, damaged_member_name]


# tools/evaluate.py: the Inception weights file does not exist, so reaching the model is already too late.

@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("role", ["samples", "ref"])
def test_evaluate_damaged_npz_fails_before_any_work(tmp_path, damage, role):
    good = images_npz(tmp_path / "good.npz")
    bad, detail = damage(tmp_path / "bad.npz")
    samples, ref = (bad, good) if role == "samples" else (good, bad)
    message = runtime_error(load_tool("evaluate").main, ["--samples", str(samples), "--ref", str(ref),
                                                         "--inception-weights", str(tmp_path / "none.pth")])
    assert message.startswith(f"error: {bad}: corrupt .npz file: arr_0.npy: ") and detail in message


@pytest.mark.parametrize("damage", DAMAGE)
def test_evaluate_write_ref_from_damaged_npz_writes_nothing(tmp_path, damage):
    bad, detail = damage(tmp_path / "bad.npz")
    message = runtime_error(load_tool("evaluate").main, ["--samples", str(bad), "--write-ref",
                                                         str(tmp_path / "ref.npz"), "--inception-weights",
                                                         str(tmp_path / "none.pth")])
    assert message.startswith(f"error: {bad}: corrupt .npz file: arr_0.npy: ") and detail in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


@pytest.mark.parametrize("key, bad_value", [("sigma", np.nan), ("mu_s", np.inf), ("sigma_s", -np.inf)])
def test_evaluate_reference_statistics_must_be_finite(tmp_path, key, bad_value):
    stats = {"mu": np.zeros(2048, np.float32), "sigma": np.eye(2048, dtype=np.float32),
             "mu_s": np.zeros(2023, np.float32), "sigma_s": np.eye(2023, dtype=np.float32)}
    stats[key].flat[7] = bad_value
    ref = tmp_path / "ref.npz"
    np.savez(ref, **stats)
    message = runtime_error(load_tool("evaluate").main, ["--samples", str(images_npz(tmp_path / "s.npz")),
                                                         "--ref", str(ref), "--inception-weights",
                                                         str(tmp_path / "none.pth")])
    assert message == f"error: {ref}: {key} holds NaN or infinite values"


# tools/convert_ckpt_to_hf.py

SHARD_SIZES = ["abc", "5", "0GB", "-5GB", "nanGB", "1e3MB"]


@pytest.mark.parametrize("size", SHARD_SIZES)
def test_convert_bad_max_shard_size_is_a_usage_error_before_writing(capsys, tmp_path, size):
    out = tmp_path / "hf"
    err = usage_error(capsys, load_tool("convert_ckpt_to_hf").main,
                      ["--ckpt", str(tmp_path / "run"), "--out", str(out), f"--max-shard-size={size}"])
    assert f"error: argument --max-shard-size: {size!r} is not a positive size such as 5GB" in err
    assert not out.exists()


@pytest.mark.parametrize("size", SHARD_SIZES)
def test_export_checks_max_shard_size_before_writing(tmp_path, size):
    from ditmoe.hf.export import export

    with pytest.raises(ValueError, match="is not a positive size"):
        export(build_model("tiny"), tmp_path / "hf", objective="ddpm", max_shard_size=size)
    assert not (tmp_path / "hf").exists()


def test_convert_accepts_the_documented_sizes():
    parser = load_tool("convert_ckpt_to_hf").build_parser()
    for size in ["5GB", "500MB", "40KB", "0.5GB", "1tb"]:
        assert parser.parse_args(["--ckpt", "c", "--out", "o", "--max-shard-size", size]).max_shard_size == size


# tools/sample.py

SAMPLE = ["--ckpt", "run", "--out", "s.npz", "--num-samples", "4"]


@pytest.mark.parametrize("scale", ["-1", "-0.5", "nan", "inf"])
def test_sample_cfg_scale_must_be_at_least_zero(capsys, scale):
    err = usage_error(capsys, load_tool("sample").parse_args, [*SAMPLE, "--cfg-scale", scale])
    assert f"error: --cfg-scale must be a number >= 0 (1: no guidance), got {float(scale)}" in err


def test_sample_cfg_scale_zero_means_unconditional_and_is_allowed():
    tool = load_tool("sample")
    assert tool.parse_args([*SAMPLE, "--cfg-scale", "0"]).cfg_scale == 0.0
    assert tool.parse_args(SAMPLE).cfg_scale == 1.0
    assert ">= 0" in tool.build_parser().format_help()


# tools/plan.py and tools/model_card.py

PLAN = ["--preset", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--zero-stage", "1", "--micro-batch-size", "2"]


@pytest.mark.parametrize("flag, value, message", [
    ("--nodes", "0", "--nodes must be positive, got 0"),
    ("--nodes", "-2", "--nodes must be positive, got -2"),
    ("--gpus-per-node", "0", "--gpus-per-node must be positive, got 0"),
    ("--ep-size", "-1", "--ep-size must be positive, got -1"),
    ("--micro-batch-size", "0", "--micro-batch-size must be positive, got 0"),
    ("--micro-batch", "-4", "--micro-batch must be positive, got -4"),
    ("--resolution", "0", "--resolution must be positive, got 0"),
    ("--image-size", "-256", "--image-size must be positive, got -256"),
    ("--gpu-memory", "0", "--gpu-memory must be positive, got 0.0"),
    ("--gpu-memory", "-80", "--gpu-memory must be positive, got -80.0"),
    ("--gpu-memory-gib", "-80", "--gpu-memory-gib must be positive, got -80.0"),
    ("--gpu-memory-gib", "nan", "argument --gpu-memory-gib: 'nan' is not a finite number"),
    ("--gpu-memory", "inf", "argument --gpu-memory-gib: 'inf' is not a finite number"),
    ("--activation-checkpointing", "-1", "--activation-checkpointing -1 must be >= 0 (0: off, n: every n-th block)"),
])
def test_plan_sizes_must_be_positive(capsys, flag, value, message):
    err = usage_error(capsys, load_tool("plan").main, [*PLAN, flag, value])
    assert f"error: {message}\n" in err


@pytest.mark.parametrize("setting, message", [
    ("depth=0", "depth must be positive, got 0"),
    ("model.depth=-2", "depth must be positive, got -2"),
    ("hidden_size=-8", "hidden_size must be positive, got -8"),
    ("num_heads=0", "num_heads must be positive, got 0"),
    ("patch_size=0", "patch_size must be positive, got 0"),
    ("input_size=0", "input_size must be positive, got 0"),
    ("in_channels=0", "in_channels must be positive, got 0"),
    ("num_classes=0", "num_classes must be positive, got 0"),
    ("mlp_ratio=0", "mlp_ratio must be positive, got 0.0"),
    ("expert_ratio=nan", "expert_ratio must be positive, got nan"),
    ("num_experts=-1", "num_experts must be >= 0, got -1"),
    ("num_shared_experts=-1", "num_shared_experts must be >= 0, got -1"),
    ("shared_expert_ratio=-0.5", "shared_expert_ratio must be >= 0, got -0.5"),
])
def test_model_card_sizes_must_be_positive(capsys, setting, message):
    err = usage_error(capsys, load_tool("model_card").main, ["--preset", "tiny", "--set", setting])
    assert f"error: {message}\n" in err


def test_model_card_allows_zero_experts_and_zero_shared_experts(capsys):
    load_tool("model_card").main(["--preset", "tiny", "--set", "num_experts=0", "--set", "num_shared_experts=0"])
    assert capsys.readouterr().out.startswith("tiny: ")


@pytest.mark.parametrize("content, message", [
    (b"the digit 3\n\nseven\n", r"line 2 is empty \(samples are indexed by prompt: remove empty lines\)"),
    (b"the digit 3\n\xff seven\n", r"not UTF-8 text \(invalid start byte at byte 12\)"),
], ids=["empty-line", "not-utf8"])
def test_a_bad_prompts_file_is_named(tmp_path, content, message):
    from ditmoe.eval.prompts import read_prompts

    (tmp_path / "p.txt").write_bytes(content)
    with pytest.raises(ValueError, match=f"^--prompts {tmp_path / 'p.txt'}: {message}"):
        read_prompts(prompts_file=str(tmp_path / "p.txt"))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_sample_capacity_threshold_outside_0_1_is_a_usage_error(capsys, tmp_path, value):
    err = usage_error(capsys, load_tool("sample").main, ["--ckpt", str(tmp_path), "--out", str(tmp_path / "s.npz"),
                                                         "--num-samples", "1", "--capacity-threshold", value])
    assert f"error: --capacity-threshold must be between 0 and 1, got {float(value)}\n" in err


def test_guiding_more_channels_than_the_model_has_is_refused():
    from ditmoe.diffusion import objective_for
    from ditmoe.sampling import generate

    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"^--guide-channels 5: the model has 4 channels$"):
        generate(model, objective_for("ddpm", model.config), torch.zeros(2, dtype=torch.long), cfg_scale=2.0,
                 guide_channels=5)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_a_deepspeed_config_with_an_optimizer_ditmoe_would_ignore_is_refused(tmp_path, block):
    from ditmoe.parallel.engine import load_config_file

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, block: {"type": "Adam", "params": {"lr": 1}}}))
    with pytest.raises(ValueError, match=f"--deepspeed-config {path}: ditmoe builds the optimizer .* remove '{block}'"):
        load_config_file(str(path))

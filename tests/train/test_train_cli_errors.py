"""The training command rejects bad input before doing any work, naming the option."""

import json

import pytest

from ditmoe.train.__main__ import main as train_main

from conftest import SMALL_DIGITS, run_cli


def fails_with(args, message):
    proc = run_cli(["-m", "ditmoe.train", *args], check=False)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr


def test_unknown_preset(tmp_path):
    fails_with(["--preset", "DiT-MoE-Q/2", "--out", str(tmp_path)], "unknown preset 'DiT-MoE-Q/2'")


def test_top_k_larger_than_experts(tmp_path):
    fails_with([*SMALL_DIGITS, "--set", "model.top_k=5", "--out", str(tmp_path)],
               "top_k=5 must be between 1 and num_experts=4")


def test_unknown_override_key(tmp_path):
    fails_with([*SMALL_DIGITS, "--set", "learning_rate=1", "--out", str(tmp_path)],
               "unknown training config key 'learning_rate'")


def test_batch_not_divisible(tmp_path):
    fails_with([*SMALL_DIGITS, "--micro-batch-size", "5", "--steps", "1", "--out", str(tmp_path)],
               "global_batch_size=16 is not divisible by micro_batch_size=5")


@pytest.mark.slow
def test_data_shape_mismatch(tmp_path):
    fails_with(["--preset", "tiny", "--data", "digits", "--steps", "1", "--out", str(tmp_path)],
               "data 'digits' has latents of shape (1, 8, 8), the model expects (4, 8, 8)")


def test_missing_deepspeed_config(tmp_path):
    fails_with([*SMALL_DIGITS, "--deepspeed-config", str(tmp_path / "x.json"), "--out", str(tmp_path)],
               "x.json: no such file")


@pytest.mark.slow
def test_divergence_stops_training_without_a_checkpoint(tmp_path):
    """An absurd learning rate makes the loss infinite within a few steps: the run stops with an error naming
    the steps, exit status 1 and no traceback, and writes no checkpoint of the diverged weights."""
    out = tmp_path / "run"
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "6", "--set", "lr=1e12", "--set", "ckpt_every=3",
                    "--out", str(out)], check=False, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: " in proc.stderr and "NaN or infinite" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((out / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("args, message", [
    (["--global-batch-size", "0"], "global_batch_size must be at least 1, got 0"),
    (["--set", "log_every=0"], "log_every must be at least 1, got 0"),
    (["--set", "ckpt_every=0"], "ckpt_every must be at least 1, got 0"),
    (["--steps", "0"], "steps must be at least 1, got 0"),
    (["--steps", "-3"], "steps must be at least 1, got -3"),
    (["--set", "max_nonfinite_steps=0"], "max_nonfinite_steps must be at least 1, got 0"),
    (["--set", "ema_decay=1.5"], "ema_decay must be between 0 and 1, got 1.5"),
])
def test_out_of_range_settings_are_usage_errors_before_any_work(tmp_path, args, message):
    """Today these crashed after a step had trained (log_every=0), or exited 0 doing nothing (steps 0)."""
    out = tmp_path / "run"
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, *args, "--out", str(out)], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_deepspeed_config_that_is_not_an_object(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text("[1, 2]")
    fails_with([*SMALL_DIGITS, "--deepspeed-config", str(config), "--out", str(tmp_path / "run")],
               f"--deepspeed-config {config}: must hold a JSON object of DeepSpeed settings, got list")
    config.write_text('{"zero_optimization": 2}')
    fails_with([*SMALL_DIGITS, "--deepspeed-config", str(config), "--out", str(tmp_path / "run")],
               "'zero_optimization' must be an object, got 2")


@pytest.mark.slow
def test_contradictory_batch_sizes_in_a_deepspeed_config_warn_once(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 999, "train_micro_batch_size_per_gpu": 16}))
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1", "--deepspeed-config", str(config),
                    "--out", str(tmp_path / "run")])
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: --deepspeed-config")]
    assert warnings == ["warning: --deepspeed-config batch sizes are overridden by the training settings: "
                        "train_batch_size=999 in the file, 16 used"], proc.stderr


@pytest.mark.parametrize("setting, message", [
    ("model.num_heads=0", "num_heads must be positive, got 0"),
    ("model.patch_size=0", "patch_size must be positive, got 0"),
    ("model.hidden_size=-8", "hidden_size must be positive, got -8"),
])
def test_model_sizes_out_of_range_are_usage_errors(tmp_path, setting, message):
    """Before, a zero size divided by zero (a traceback) when the model config was built."""
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--set", setting, "--out", str(tmp_path / "run")],
                   check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_empty_out_is_refused(tmp_path):
    fails_with([*SMALL_DIGITS, "--out", ""], "out must name a folder, got ''")


def test_bad_resume_changes_are_refused(tmp_path):
    fails_with([*SMALL_DIGITS, "--set", "resume_changes=objective,seed", "--out", str(tmp_path)],
               "resume_changes: seed cannot be changed on resume; choose from objective, text_encoder")


def test_an_out_holding_only_tensorboard_events_is_refused(tmp_path):
    """An earlier run's events alone (its metrics deleted): the two runs' event files would mix."""
    events = tmp_path / "tensorboard" / "events.out.tfevents.1.host"
    events.parent.mkdir()
    events.write_bytes(b"earlier run")
    fails_with([*SMALL_DIGITS, "--steps", "1", "--out", str(tmp_path)],
               f"{tmp_path} already holds a run (TensorBoard events): pass --resume auto")
    assert events.read_bytes() == b"earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "tensorboard"]


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "seed must be in [0, 2**63), got -1"),
    (["--seed", str(2**64)], f"seed must be in [0, 2**63), got {2**64}"),  # was torch's "Overflow when unpacking"
    (["--set", "precision=fp16"], "precision must be one of auto, fp32, bf16, got 'fp16'"),
    (["--set", "lr=nan"], "lr must be a finite number, got nan"),
    (["--set", "lr=inf"], "lr must be a finite number, got inf"),
    (["--set", "weight_decay=nan"], "weight_decay must be a finite number, got nan"),
], ids=["negative-seed", "huge-seed", "fp16", "lr-nan", "lr-inf", "weight-decay-nan"])
def test_settings_out_of_range_are_usage_errors(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        train_main([*SMALL_DIGITS, *args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_sampler_the_objective_lacks_is_refused_before_training(tmp_path, capsys):
    """The demo samples with DPM-Solver++ during and after training: rectified flow has only Euler."""
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "demo", "--objective", "rectified_flow", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert "eval_sampler='dpm_solver++' cannot sample objective 'rectified_flow'" in err
    assert "choose one of euler" in err

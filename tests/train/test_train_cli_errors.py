"""The training command rejects bad input before doing any work, naming the option."""

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


def test_data_shape_mismatch(tmp_path):
    fails_with(["--preset", "tiny", "--data", "digits", "--steps", "1", "--out", str(tmp_path)],
               "data 'digits' has latents of shape (1, 8, 8), the model expects (4, 8, 8)")


def test_missing_deepspeed_config(tmp_path):
    fails_with([*SMALL_DIGITS, "--deepspeed-config", str(tmp_path / "x.json"), "--out", str(tmp_path)],
               "x.json: no such file")


def test_divergence_stops_training_without_a_checkpoint(tmp_path):
    """An absurd learning rate makes the loss infinite within a few steps: the run stops with an error naming
    the steps, exit status 1 and no traceback, and writes no checkpoint of the diverged weights."""
    out = tmp_path / "run"
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "6", "--set", "lr=1e12", "--set", "ckpt_every=3",
                    "--out", str(out)], check=False, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: " in proc.stderr and "NaN or infinite in steps" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((out / "checkpoints").glob("step_*"))

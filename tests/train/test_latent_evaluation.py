"""Evaluation while training on latent shards: validation loss on val_data, samples decoded by the dataset's VAE."""

import numpy as np
import pytest
from PIL import Image

from ditmoe.data.latent_format import write_latent_dataset
from ditmoe.data.synthetic import save_tiny_vae

from conftest import eval_records, run_cli

pytestmark = pytest.mark.slow  # a training run

MODEL = ["--preset", "demo", "--set", "model.in_channels=4", "--set", "model.input_size=4", "--set",
         "model.num_classes=2", "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2"]


def latent_dataset(root, n, seed):
    """``n`` latents (4, 4, 4) of two classes, as a tiny random VAE's (x8: 32-pixel images), scaling 0.5."""
    rng = np.random.default_rng(seed)
    return write_latent_dataset(root, rng.standard_normal((n, 4, 4, 4)).astype(np.float32), 0.0, np.arange(n) % 2,
                                vae=str(root.parent / "vae"), scaling_factor=0.5, resolution=32)


def test_latent_runs_validate_on_val_data_and_decode_their_samples(tmp_path):
    save_tiny_vae(tmp_path / "vae")
    latent_dataset(tmp_path / "train", 32, seed=0)
    latent_dataset(tmp_path / "val", 12, seed=1)
    out = tmp_path / "run"
    run_cli(["-m", "ditmoe.train", *MODEL, "--data", str(tmp_path / "train"), "--global-batch-size", "8",
             "--steps", "2", "--set", "eval_samples=0", "--val-data", str(tmp_path / "val"),
             "--set", "eval_every=1", "--set", "sample_every=2", "--set", "sample_samples=20",
             "--set", "eval_steps=2", "--out", str(out)], env={"HF_HUB_OFFLINE": "1"})
    records = eval_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["val_ema/loss"] != records[1]["val_ema/loss"] and records[1]["val/loss"] > 0
    assert not [k for k in records[1] if k.startswith("samples/")]  # no eval_ref: no FID, the grid only
    grid = Image.open(out / "samples" / "step_00000002.png")
    assert grid.mode == "RGB" and grid.size == (4 * (10 * 33 + 1), 4 * (2 * 33 + 1))  # 2 rows of 10 images of 32


def test_val_data_is_checked_like_data(tmp_path):
    save_tiny_vae(tmp_path / "vae")
    latent_dataset(tmp_path / "train", 16, seed=0)
    proc = run_cli(["-m", "ditmoe.train", *MODEL, "--data", str(tmp_path / "train"), "--global-batch-size", "8",
                    "--steps", "1", "--set", f"val_data={tmp_path / 'none'}", "--out", str(tmp_path / "run")],
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"val_data '{tmp_path / 'none'}': expected 'digits' or a directory of latent shards" in proc.stderr

"""tools/sample.py writes ADM-format npz files (and a grid) from a training checkpoint."""

import numpy as np
from PIL import Image

from conftest import run_cli


def test_sample_tool_writes_adm_npz_and_grid(trained_digits_run, tmp_path):
    out, grid = tmp_path / "s.npz", tmp_path / "grid.png"
    run_cli(["tools/sample.py", "--ckpt", str(trained_digits_run), "--out", str(out), "--num-samples", "20",
             "--sampler", "ddim", "--steps", "5", "--cfg-scale", "2.0", "--grid", str(grid), "--seed", "3"])
    data = np.load(out)
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (20, 8, 8, 1)
    assert data["arr_1"].dtype == np.int64 and np.array_equal(np.bincount(data["arr_1"]), [2] * 10)
    assert data["arr_0"].std() > 0
    assert Image.open(grid).size == (4 * (2 * 9 + 1), 4 * (10 * 9 + 1))


def test_sample_tool_is_deterministic_per_seed(trained_digits_run, tmp_path):
    args = ["tools/sample.py", "--ckpt", str(trained_digits_run), "--num-samples", "10", "--sampler", "ddim",
            "--steps", "4"]
    run_cli([*args, "--out", str(tmp_path / "a.npz"), "--seed", "1"])
    run_cli([*args, "--out", str(tmp_path / "b.npz"), "--seed", "1"])
    run_cli([*args, "--out", str(tmp_path / "c.npz"), "--seed", "2"])
    a, b, c = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_tool_missing_checkpoint(tmp_path):
    proc = run_cli(["tools/sample.py", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "s.npz"),
                    "--num-samples", "4"], check=False)
    assert proc.returncode != 0 and "none: no such file or directory" in proc.stderr


def test_sample_tool_unknown_sampler(trained_digits_run, tmp_path):
    proc = run_cli(["tools/sample.py", "--ckpt", str(trained_digits_run), "--out", str(tmp_path / "s.npz"),
                    "--num-samples", "4", "--sampler", "plms"], check=False)
    assert proc.returncode != 0 and "sampler='plms'" in proc.stderr

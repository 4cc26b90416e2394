"""tools/sample.py writes ADM-format npz files (and a grid) from a training checkpoint, alone or under torchrun."""

import numpy as np
import pytest
from PIL import Image

from ditmoe.sampling import rank_batches

from conftest import free_port, run_cli


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


@pytest.mark.slow
def test_sample_tool_with_triton_experts_draws_the_torch_samples(trained_digits_run, tmp_path):
    """--expert-gemm triton (DeepSpeed's kernels, in Triton's interpreter here) samples what torch does."""
    args = ["tools/sample.py", "--ckpt", str(trained_digits_run), "--num-samples", "4", "--sampler", "ddim",
            "--steps", "3", "--batch-size", "4"]
    for kernel in ("torch", "triton"):
        run_cli([*args, "--out", str(tmp_path / f"{kernel}.npz"), "--expert-gemm", kernel])
    torch_images, triton_images = (np.load(tmp_path / f"{k}.npz")["arr_0"].astype(int) for k in ("torch", "triton"))
    assert np.abs(triton_images - torch_images).max() <= 1 and torch_images.std() > 0


def test_sample_tool_missing_checkpoint(tmp_path):
    proc = run_cli(["tools/sample.py", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "s.npz"),
                    "--num-samples", "4"], check=False)
    assert proc.returncode != 0 and "none: no such file or directory" in proc.stderr


def test_sample_tool_unknown_sampler(trained_digits_run, tmp_path):
    proc = run_cli(["tools/sample.py", "--ckpt", str(trained_digits_run), "--out", str(tmp_path / "s.npz"),
                    "--num-samples", "4", "--sampler", "plms"], check=False)
    assert proc.returncode != 0 and "sampler='plms'" in proc.stderr


def test_rank_batches_cover_all_batches_in_order():
    for total in range(9):
        for world in range(1, 5):
            shares = [rank_batches(total, rank, world) for rank in range(world)]
            assert [b for share in shares for b in share] == list(range(total))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.slow
def test_sample_tool_under_torchrun_matches_one_process(trained_digits_run, tmp_path):
    """13 samples in batches of 3 on 2 gloo ranks (3 and 2 batches, the last one short): rank 0 writes
    exactly the single process's arrays and grid, once, and removes the ranks' parts. DDPM draws noise at
    every step, so this also checks that each batch's random numbers do not depend on the rank."""
    args = ["tools/sample.py", "--ckpt", str(trained_digits_run), "--num-samples", "13", "--batch-size", "3",
            "--sampler", "ddpm", "--steps", "3", "--cfg-scale", "1.5", "--seed", "5"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {"OMP_NUM_THREADS": "1"}
    run_cli([*args, "--out", str(one / "s.npz"), "--grid", str(one / "grid.png")], env=env)
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "--master_addr", "127.0.0.1", *args, "--out", str(two / "s.npz"), "--grid", str(two / "grid.png")],
                   env=env)
    assert proc.stdout.count("wrote 13 samples of shape (8, 8, 1)") == 1
    assert sorted(p.name for p in two.iterdir()) == ["grid.png", "s.npz"]
    a, b = np.load(one / "s.npz"), np.load(two / "s.npz")
    assert a.files == b.files == ["arr_0", "arr_1"]
    for key in a.files:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
    assert np.array_equal(b["arr_1"], np.arange(13) % 10)
    assert np.array_equal(np.asarray(Image.open(one / "grid.png")), np.asarray(Image.open(two / "grid.png")))

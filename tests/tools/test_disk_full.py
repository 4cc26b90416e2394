"""A full disk outside checkpoints: the Hugging Face export, upcycling, latent precomputation, sampling and the
metrics of a training each stop with one line naming the file they could not write (exit 1, no traceback),
leave no partial file behind and keep what was there before. Each fills a small tmpfs (tests/disk_full.py)."""

import gc
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from ditmoe.data.synthetic import encode_image, natural_image, save_tiny_vae, write_tar
from ditmoe.model import DiT, DiTConfig
from ditmoe.train.metrics import MetricsWriter
from ditmoe.weights import dit
from ditmoe.write_errors import WriteFailed

from conftest import SMALL_DIGITS, load_tool, run_cli
from disk_full import FILLER, fill, pages, snapshot, tmpfs

PAGE = 4096


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The CPU cores are shared."""


def tool_error(tool: str, argv: list) -> tuple[str, str]:
    """The message ``tools/TOOL.py`` run in this process with ``argv`` exits with (it must fail as a user error:
    status 1, the message on stderr), and the type of the error the writing library raised."""
    result = None
    try:
        load_tool(tool).main([str(a) for a in argv])
    except SystemExit as exit:
        result = exit.code, type(exit.__context__ and exit.__context__.__cause__).__name__
    gc.collect()  # the traceback's frames held the file that failed, open: the tmpfs could not be unmounted
    assert result is not None, f"tools/{tool}.py succeeded"
    assert isinstance(result[0], str), result[0]
    return result


def error_line(proc) -> str:
    """The one-line error of a command that failed as a user error (exit 1, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def no_traceback(capfd):
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]


@pytest.mark.slow
def test_export(trained_digits_run, tmp_path, capfd):
    """Room for config.json, not for the weights: safetensors fails, the staged folder goes, the old export stays."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "hf"
    args = ["--ckpt", trained_digits_run, "--out", out]
    with tmpfs(disk, 2 << 20):
        load_tool("convert_ckpt_to_hf").main([str(a) for a in args])
        before = snapshot(disk)
        fill(disk, leave=PAGE)
        message, raised = tool_error("convert_ckpt_to_hf", [*args, "--overwrite"])
        assert message == f"error: no space left on {disk} writing {out}" and raised == "SafetensorError"
        assert sorted(os.listdir(disk)) == [FILLER, "hf"] and snapshot(disk) == before
    no_traceback(capfd)


def dense_dit_file(path):
    """A tiny dense DiT in facebookresearch/DiT's layout (MLP biases zero, as an exact upcycling needs)."""
    model = DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10, num_experts=0))
    state = dit.from_ditmoe(model.state_dict())
    for name, tensor in state.items():
        if ".mlp.fc" in name and name.endswith(".bias"):
            tensor.zero_()
    torch.save(state, path)
    return path


@pytest.mark.parametrize("room", ["nothing", "the weights"])
def test_upcycle(tmp_path, capfd, room):
    """--overwrite of an earlier upcycled model: no room for upcycled.pt, or room for it but not for upcycle.json.
    Both staged files go and the earlier model stays as it was."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "up"
    args = ["--from", "dit", "--ckpt", dense_dit_file(tmp_path / "dense.pt"), "--num-heads", 2, "--out", out,
            "--set", "num_experts=4", "--set", "top_k=2", "--set", "norm_topk_prob=true",
            "--set", "expert_activation=gelu", "--set", "num_shared_experts=0"]
    with tmpfs(disk, 1 << 20):
        load_tool("upcycle").main([str(a) for a in args])
        before = snapshot(disk)
        fill(disk, leave=0 if room == "nothing" else pages(out / "upcycled.pt"))
        message, raised = tool_error("upcycle", [*args, "--overwrite", "--seed", 1])
        name, raised_by = ("upcycled.pt", "RuntimeError") if room == "nothing" else ("upcycle.json", "OSError")
        assert message == f"error: no space left on {disk} writing {out / name}" and raised == raised_by
        assert sorted(os.listdir(out)) == ["upcycle.json", "upcycled.pt"] and snapshot(disk) == before
    no_traceback(capfd)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.mark.slow
def test_precompute(vae, tmp_path, capfd):
    """A dataset of shard a, then a and b (3 samples) on a full disk: b's temporary tar goes, the dataset stays."""
    disk = tmp_path / "disk"
    disk.mkdir()
    image = {"png": encode_image(natural_image(16, 16, 0), "PNG"), "cls": b"1"}
    write_tar(tmp_path / "a.tar", [("a0", image)])
    write_tar(tmp_path / "b.tar", [(f"b{i}", image) for i in range(3)])
    args = ["--input", tmp_path / "a.tar", tmp_path / "b.tar", "--out", disk, "--resolution", 256, "--vae", vae,
            "--batch-size", 4, "--workers", 1, "--device", "cpu", "--decoder", "pil"]
    with tmpfs(disk, 1 << 20):
        load_tool("precompute_latents").main([str(a) for a in args[:2] + args[3:]])  # a alone
        before = snapshot(disk)
        fill(disk, leave=2 * PAGE)  # b's first record (34 kB) does not fit
        message, _ = tool_error("precompute_latents", args)
        assert message == f"error: no space left on {disk} writing {disk / 'b.tar'}"
        assert sorted(os.listdir(disk)) == sorted([FILLER, *before]) and snapshot(disk) == before
        assert sorted(before) == ["a.tar", "a.tar.json", "manifest.json", "rejects.jsonl"]
    no_traceback(capfd)


def sample(run, out, grid, seed):
    return run_cli(["tools/sample.py", "--ckpt", str(run), "--out", str(out), "--grid", str(grid), "--seed", str(seed),
                    "--num-samples", "200", "--sampler", "ddim", "--steps", "2"], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("room", ["nothing", "the part", "the part and the npz"])
def test_sample(trained_digits_run, tmp_path, room):
    """Over an earlier s.npz and s.png, 200 samples (a 13 kB part, a 15 kB npz, a grid): the part, the npz or the
    grid does not fit. The part and the temporary npz or grid go; the earlier npz and grid stay as they were."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, 1 << 20):
        assert sample(trained_digits_run, disk / "s.npz", disk / "s.png", seed=1).returncode == 0
        before = snapshot(disk)
        part = 128 + 200 * 8 * 8  # .npy header, 200 images of 8 x 8 x 1
        fill(disk, leave={"nothing": 0, "the part": pages_of(part), "the part and the npz": pages_of(part) +
                          pages_of(len(before["s.npz"]))}[room])
        out = disk / ("t.npz" if room == "the part and the npz" else "s.npz")  # t.npz: no earlier file to replace
        line = error_line(sample(trained_digits_run, out, disk / "s.png", seed=2))
        failed = {"nothing": disk / "s.npz.rank00000-of-00001.npy", "the part": out,
                  "the part and the npz": disk / "s.png"}[room]
        assert line == f"error: no space left on {disk} writing {failed}"
        after = snapshot(disk)
        assert {name: after[name] for name in before} == before
        assert sorted(after) == sorted({*before, out.name})  # nothing else: the complete t.npz where it was written
        if out.name == "t.npz":
            assert np.load(out)["arr_0"].shape == (200, 8, 8, 1)


def pages_of(size: int) -> int:
    return -(-size // PAGE) * PAGE


def test_metrics_writer_cuts_a_torn_line_off(tmp_path, capfd):
    """Records of 150 bytes until the disk is full: the one that does not fit is not half there."""
    disk = tmp_path / "disk"
    disk.mkdir()
    record = {"step": 0, **{f"s{i}": 1.0 for i in range(10)}}
    with tmpfs(disk, 1 << 20):
        fill(disk, leave=PAGE)
        writer = MetricsWriter(disk, tensorboard=False)
        with pytest.raises(WriteFailed) as failed:
            for step in range(1, 100):
                writer.log({**record, "step": step})
        writer.close()
        assert str(failed.value) == f"no space left on {disk} writing {disk / 'metrics.jsonl'}"
        text = (disk / "metrics.jsonl").read_text()
        assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, step))
    no_traceback(capfd)


def test_metrics_writer_names_the_tensorboard_folder(tmp_path, capfd):
    """TensorBoard's events (about 60 bytes a scalar, 12 in JSON) fill their page first; its writer thread's
    error is raised once, in the caller's thread, and closing after it raises nothing."""
    disk = tmp_path / "disk"
    disk.mkdir()
    record = {"step": 0, **{f"s{i}": 1.0 for i in range(10)}}
    with tmpfs(disk, 1 << 20):
        writer = MetricsWriter(disk, tensorboard=True)
        writer.log(record)  # both files have a page now
        fill(disk, leave=0)
        with pytest.raises(WriteFailed) as failed:
            for step in range(1, 100):
                writer.log({**record, "step": step})
        writer.close()
        assert str(failed.value) == f"no space left on {disk} writing {disk / 'tensorboard'}"
        lines = (disk / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(step + 1))
    no_traceback(capfd)


def fill_when(path, lines: int, disk, stop: threading.Event):
    """Fill ``disk`` up as soon as ``path`` holds ``lines`` lines (or ``stop`` is set)."""
    while not stop.is_set():
        if path.is_file() and path.read_bytes().count(b"\n") >= lines:
            try:
                fill(disk)
            except (OSError, AssertionError):
                pass  # the training wrote meanwhile: the disk is full all the same
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_training_metrics(tmp_path):
    """A training whose run folder fills up after 3 logged steps (of 1000): metrics.jsonl keeps whole records, the
    run stops at the next record that needs room, and config.toml, written before, stays."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    train = ["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1000", "--set", "ckpt_every=1000",
             "--set", "tensorboard=false", "--out", str(out)]
    with tmpfs(disk, 64 << 20):
        stop = threading.Event()
        watcher = threading.Thread(target=fill_when, args=(out / "metrics.jsonl", 3, disk, stop))
        watcher.start()
        try:
            proc = run_cli(train, check=False)
        finally:
            stop.set()
            watcher.join()
        assert error_line(proc) == f"error: no space left on {disk} writing {out / 'metrics.jsonl'}"
        text = (out / "metrics.jsonl").read_text()
        steps = [record["step"] for record in map(json.loads, text.splitlines()) if "loss" in record]
        assert text.endswith("\n") and steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 100
        assert "[model]" in (out / "config.toml").read_text() and not (out / "checkpoints/latest").exists()

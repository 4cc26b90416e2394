"""Checkpoint files are read without running code from them, and a damaged, missing or unwritable
checkpoint is one clear error (exit 1, one line naming the file) instead of a traceback."""

import shutil
from pathlib import Path

import pytest
import torch

from ditmoe.checkpoint import read_meta
from ditmoe.inference import load_model
from ditmoe.weights.safe_load import safe_load

from conftest import SMALL_DIGITS, run_cli
from disk_full import tmpfs

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

TRAIN = ["-m", "ditmoe.train", *SMALL_DIGITS]
TAG = "checkpoints/step_00000002"


class PlantedCode:
    """Unpickling this creates ``marker`` (through ``open``): what a crafted checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(file: Path, marker: Path):
    torch.save({"module": PlantedCode(marker)}, file)


def truncate(file: Path):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def resume(run: Path):
    return run_cli([*TRAIN, "--steps", "3", "--resume", "auto", "--out", str(run)], check=False)


def sample(run: Path, *args: str):
    return run_cli(["tools/sample.py", "--ckpt", str(run), "--out", str(run / "s.npz"), "--num-samples", "2",
                    "--sampler", "ddim", "--steps", "2", *args], check=False)


def convert(run: Path):
    return run_cli(["tools/convert_ckpt_to_hf.py", "--ckpt", str(run), "--out", str(run / "hf")], check=False)


def error_line(proc) -> str:
    """The one-line error of a command that failed as a user error (exit 1, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run with its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("trained")
    run_cli([*TRAIN, "--steps", "2", "--out", str(out)])
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run for one test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_safe_load_refuses_pickled_objects(tmp_path):
    marker, file = tmp_path / "marker", tmp_path / "planted.pt"
    plant(file, marker)
    with pytest.raises(ValueError, match=f"checkpoint file {file}: ditmoe refuses to unpickle non-tensor type"):
        safe_load(file)
    assert not marker.exists()


@pytest.mark.parametrize("name,weights", [("mp_rank_00_model_states.pt", "model"), ("ema.pt", "ema")])
def test_load_model_refuses_planted_code(run, tmp_path, name, weights):
    marker, file = tmp_path / "marker", run / TAG / name
    plant(file, marker)
    with pytest.raises(ValueError, match=f"checkpoint file {file}: ditmoe refuses to unpickle non-tensor type"):
        load_model(run, weights=weights)
    assert not marker.exists()


def test_sample_tool_refuses_planted_code(run, tmp_path):
    marker, file = tmp_path / "marker", run / TAG / "mp_rank_00_model_states.pt"
    plant(file, marker)
    line = error_line(sample(run, "--weights", "model"))
    assert f"checkpoint file {file}: ditmoe refuses to unpickle non-tensor type" in line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "ema.pt"])
def test_resume_refuses_planted_code_before_deepspeed_loads_it(run, tmp_path, name):
    marker, file = tmp_path / "marker", run / TAG / name
    plant(file, marker)
    line = error_line(resume(run))
    assert f"checkpoint file {file}: ditmoe refuses to unpickle non-tensor type" in line
    assert not marker.exists()
    assert not (run / "checkpoints/step_00000003").exists()


@pytest.mark.parametrize("command", [resume, sample, convert])
def test_truncated_ema_is_a_clear_error(run, command):
    file = run / TAG / "ema.pt"
    truncate(file)
    assert f"checkpoint file {file} is truncated or corrupt (" in error_line(command(run))


@pytest.mark.parametrize("damage", ["cut-to-8-kB", "text-file"])
@pytest.mark.parametrize("command", [resume, sample, convert])
def test_damaged_ema_is_named_on_every_path(run, command, damage):
    """A mapped zip cut short fails with EINVAL and a text file read as a pickle with a bare KeyError: both
    are the same named error."""
    file = run / TAG / "ema.pt"
    assert file.stat().st_size > 8192
    if damage == "text-file":
        file.write_text("not a checkpoint\n")
    else:
        file.write_bytes(file.read_bytes()[:8192])
    assert f"checkpoint file {file} is truncated or corrupt (" in error_line(command(run))


def test_missing_model_states_on_resume(run):
    (run / TAG / "mp_rank_00_model_states.pt").unlink()
    assert f"checkpoint {run / TAG}: missing mp_rank_00_model_states.pt" in error_line(resume(run))


def test_meta_json_without_keys_on_resume(run):
    (run / TAG / "meta.json").write_text("{}")
    assert f"checkpoint file {run / TAG / 'meta.json'}: missing key 'model_config'" in error_line(resume(run))


@pytest.mark.parametrize("content", [b"{}", b"\xff\xfe{}", b"{not json", b"[]"])
def test_broken_meta_json_names_the_file(tmp_path, content):
    file = tmp_path / "meta.json"
    file.write_bytes(content)
    with pytest.raises((KeyError, ValueError)) as info:
        read_meta(tmp_path)["model_config"]
    assert str(info.value).startswith(f"checkpoint file {file}")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(trained, tmp_path):
    """Checkpoints every 2 steps on a device with room for 1.5 checkpoints: the second one does not fit."""
    out, kept = tmp_path / "run", tmp_path / "kept"
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True)
    size = sum(f.stat().st_size for f in (trained / TAG).iterdir())
    with tmpfs(ckpt_root, size * 3 // 2):
        proc = run_cli([*TRAIN, "--steps", "4", "--set", "ckpt_every=2", "--out", str(out)], check=False)
        shutil.copytree(out, kept)
    assert error_line(proc).startswith(f"error: no space left on {ckpt_root} writing {ckpt_root / 'step_00000004'}")
    assert (kept / "checkpoints/latest").read_text() == "step_00000002"
    load_model(kept, weights="model")
    resumed = run_cli([*TRAIN, "--steps", "3", "--resume", "auto", "--out", str(kept)])
    assert f"resumed from {kept / TAG} at step 2" in resumed.stdout

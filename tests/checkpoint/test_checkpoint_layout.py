"""Checkpoint layout without training: tag resolution, ``latest``, meta checks and EMA files."""

import json
from pathlib import Path

import pytest
import torch

from ditmoe import checkpoint
from ditmoe.model import get_preset


@pytest.fixture
def run_dir(tmp_path):
    """OUT/checkpoints with tags step 2 and step 4 (meta.json only), ``latest`` naming step 4."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        tag_dir = root / checkpoint.tag_for_step(step)
        tag_dir.mkdir(parents=True)
        checkpoint.write_meta(tag_dir, {"step": step, "model_config": get_preset("tiny").to_dict(), "zero_stage": 2})
    (root / "latest").write_text("step_00000004")
    return tmp_path


def test_tag_names():
    assert checkpoint.tag_for_step(12) == "step_00000012"
    assert checkpoint.universal_dir(Path("a/step_1")) == Path("a/step_1_universal")


def test_latest_from_run_checkpoints_or_tag_directory(run_dir):
    latest = run_dir / "checkpoints/step_00000004"
    assert checkpoint.resolve_checkpoint(run_dir) == latest
    assert checkpoint.resolve_checkpoint(run_dir / "checkpoints") == latest
    assert checkpoint.resolve_checkpoint(run_dir / "checkpoints/step_00000002") == run_dir / "checkpoints/step_00000002"


def test_named_tag(run_dir):
    expected = run_dir / "checkpoints/step_00000002"
    assert checkpoint.resolve_checkpoint(run_dir, tag="step_00000002") == expected
    assert checkpoint.resolve_checkpoint(run_dir / "checkpoints", tag="step_00000002") == expected


def test_errors_name_the_problem(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory"):
        checkpoint.resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tag 'step_00000099' in it or in"):
        checkpoint.resolve_checkpoint(run_dir, tag="step_00000099")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json and no 'latest' file"):
        checkpoint.resolve_checkpoint(tmp_path / "empty")
    (run_dir / "checkpoints/latest").write_text("step_00000006")
    with pytest.raises(FileNotFoundError, match="names 'step_00000006', which does not exist"):
        checkpoint.resolve_checkpoint(run_dir)


def test_resume_compatibility(run_dir):
    tag_dir = run_dir / "checkpoints/step_00000004"
    meta = checkpoint.read_meta(tag_dir)
    checkpoint.check_resume_compatible(meta, get_preset("tiny"), tag_dir)
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32 vs now 64"):
        checkpoint.check_resume_compatible(meta, get_preset("tiny").replace(hidden_size=64), tag_dir)
    checkpoint.check_universal_compatible(meta, 1, tag_dir)
    with pytest.raises(ValueError, match="was saved with ZeRO-2.*use --zero-stage 2"):
        checkpoint.check_universal_compatible(meta, 3, tag_dir)
    with pytest.raises(ValueError, match="does not record its ZeRO stage"):
        checkpoint.check_universal_compatible({}, 2, tag_dir)
    with pytest.raises(ValueError, match="this run uses ZeRO-0.*pass --zero-stage 2"):
        checkpoint.check_universal_compatible(meta, 0, tag_dir)
    with pytest.raises(ValueError, match="was saved with ZeRO-0"):
        checkpoint.check_universal_compatible({**meta, "zero_stage": 0}, 1, tag_dir)


def test_meta_is_indented_json(run_dir):
    text = (run_dir / "checkpoints/step_00000002/meta.json").read_text()
    assert text.startswith('{\n  "step": 2') and json.loads(text)["step"] == 2


def test_ema_files(tmp_path):
    full, local = {"w": torch.arange(4.0)}, {"w": torch.arange(2.0)}
    checkpoint.save_ema(tmp_path, 0, full=full, local=local)
    checkpoint.save_ema(tmp_path, 1, full={}, local={"w": torch.arange(2.0, 4.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pt", "ema_local_rank00000.pt", "ema_local_rank00001.pt"]
    assert torch.equal(checkpoint.load_full_ema(tmp_path)["w"], full["w"])
    assert torch.equal(checkpoint.load_local_ema(tmp_path, {"ema_shards": 2}, 1)["w"], torch.arange(2.0, 4.0))
    assert torch.equal(checkpoint.load_local_ema(tmp_path, {"ema_shards": 0}, 1)["w"], full["w"])
    with pytest.raises(FileNotFoundError, match="missing ema_local_rank00002.pt"):
        checkpoint.load_local_ema(tmp_path, {"ema_shards": 2}, 2)


def test_resume_check_takes_settings_newer_than_the_checkpoint_as_their_defaults(tmp_path):
    """A checkpoint written before a model setting existed resumes when the run keeps that setting's default,
    and is refused when the run changes it."""
    config = get_preset("tiny")
    saved = config.to_dict()
    del saved["num_kv_heads"], saved["expert_activation"]  # as an older ditmoe wrote it
    checkpoint.check_resume_compatible({"model_config": saved}, config, tmp_path)
    with pytest.raises(ValueError, match="expert_activation: checkpoint 'swiglu' vs now 'gelu'"):
        checkpoint.check_resume_compatible({"model_config": saved}, config.replace(expert_activation="gelu"), tmp_path)

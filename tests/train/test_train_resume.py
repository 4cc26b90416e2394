"""End to end: train -> checkpoint -> --resume auto is bit-identical to an uninterrupted run (CPU fp32)."""

import json
import shutil

import pytest
import torch

from ditmoe.train.run_dir import LOCK_FILE
from ditmoe.train.validation import NUM_BUCKETS

from conftest import SMALL_DIGITS, eval_records, metrics, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    split = tmp_path_factory.mktemp("split")
    common = [*SMALL_DIGITS, "--set", "ckpt_every=3", "--seed", "7", "--set", "eval_every=3", "--set", "sample_every=3",
              "--set", "sample_samples=100"]
    run_cli(["-m", "ditmoe.train", *common, "--steps", "6", "--out", str(full)])
    run_cli(["-m", "ditmoe.train", *common, "--steps", "3", "--out", str(split)])
    resumed = run_cli(["-m", "ditmoe.train", *common, "--steps", "6", "--out", str(split), "--resume", "auto"])
    plain = tmp_path_factory.mktemp("plain")  # the same run without evaluations
    run_cli(["-m", "ditmoe.train", *common, "--steps", "6", "--out", str(plain), "--set", "eval_every=0",
             "--set", "sample_every=0"])
    return full, split, resumed, plain


def test_resume_is_bit_identical(runs):
    full, split, resumed, _ = runs
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mse", "vb", "balance_loss", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert len({r["loss"] for r in a}) == 6  # the losses really change from step to step
    ema_a = torch.load(full / "checkpoints/step_00000006/ema.pt")
    ema_b = torch.load(split / "checkpoints/step_00000006/ema.pt")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_validation_loss_and_samples_repeat_across_a_resume(runs):
    full, split, _, _ = runs
    a, b = eval_records(full), eval_records(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    keys = [k for k in a[0] if k.startswith(("val/", "val_ema/", "samples/"))]
    assert len(keys) == 2 * (2 + NUM_BUCKETS) + 4  # loss, mse and 8 bands for both weights; 4 quality numbers
    for key in keys:
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert a[1]["val/loss"] < a[0]["val/loss"]  # 6 steps at lr 3e-3 lower the held-out loss
    assert a[1]["val_ema/loss"] != a[1]["val/loss"]  # two sets of weights
    assert all(0 < r["eval/time_fraction"] < 1 for r in a)


def test_evaluations_change_nothing_in_training(runs):
    full, _, _, plain = runs
    assert metrics(full) and [{k: v for k, v in r.items() if k != "samples_per_s"} for r in metrics(full)] == \
        [{k: v for k, v in r.items() if k != "samples_per_s"} for r in metrics(plain)]
    assert eval_records(plain) == [] and not (plain / "samples").exists()
    ema_a = torch.load(full / "checkpoints/step_00000006/ema.pt")
    ema_b = torch.load(plain / "checkpoints/step_00000006/ema.pt")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    meta_a, meta_b = (json.loads((run / "checkpoints/step_00000006/meta.json").read_text()) for run in (full, plain))
    assert meta_a["rng"] == meta_b["rng"]


def test_the_periodic_sample_grid_goes_to_png_and_tensorboard(runs):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full, split, _, _ = runs
    for step in (3, 6):
        png = Image.open(full / "samples" / f"step_{step:08d}.png")
        assert png.size == (4 * (10 * 9 + 1), 4 * (10 * 9 + 1))  # 10 classes × 10 samples of 8×8, 1-pixel gaps, ×4
        assert (full / "samples" / f"step_{step:08d}.png").read_bytes() == \
            (split / "samples" / f"step_{step:08d}.png").read_bytes()
    events = EventAccumulator(str(split / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples")
    assert [e.step for e in images] == [3, 6]  # the resumed run's events hold both grids, once each
    assert (images[0].width, images[0].height) == png.size
    assert "val_ema/loss/t7" in events.Tags()["scalars"]


def test_metrics_and_tensorboard_have_the_same_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full, _, _, _ = runs
    records = metrics(full)
    first = records[0]
    for key in ("step", "loss", "mse", "vb", "balance_loss", "grad_norm", "lr", "samples_per_s"):
        assert key in first
    loads = [k for k in first if k.endswith("/load")]
    assert loads and all(sum(first[k]) == pytest.approx(1.0) for k in loads)
    assert first["loss"] == pytest.approx(first["mse"] + first["vb"] + first["balance_loss"], rel=1e-5)
    assert 0.005 * 0.9 * len(loads) < first["balance_loss"] < 0.005 * 4 * len(loads)
    events = EventAccumulator(str(full / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "moe/block0/load_cv" in events.Tags()["scalars"]


def test_resume_from_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "1", "--out", str(tmp_path),
                    "--resume", str(tmp_path / "nope")], check=False)
    assert proc.returncode != 0 and "nope: no such file or directory" in proc.stderr


def test_resume_with_another_model_config_is_a_clear_error(runs, tmp_path):
    full, _, _, _ = runs
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--set", "model.hidden_size=64", "--steps", "8",
                    "--out", str(full), "--resume", "auto"], check=False)
    assert proc.returncode != 0 and "hidden_size: checkpoint 32 vs now 64" in proc.stderr


def snapshot(folder) -> dict[str, bytes]:
    """Every file of a run folder but its lock (which records the last holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.parametrize("change, message", [
    (["--objective", "rectified_flow"], "objective: checkpoint 'ddpm' vs now 'rectified_flow'); pass --set "
                                        "resume_changes=objective to change it on purpose"),
    (["--seed", "9"], "seed: checkpoint 7 vs now 9); seed fix the data order and noise of a run: start a new run"),
    (["--zero-stage", "1"], "was saved with ZeRO-0, this run uses ZeRO-1: pass --zero-stage 0 to resume it"),
], ids=["objective", "seed", "zero-stage"])
def test_a_refused_resume_changes_nothing(runs, tmp_path, change, message):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    before = snapshot(out)
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--set", "ckpt_every=3", "--seed", "7", "--steps", "8",
                    *change, "--out", str(out), "--resume", "auto"], check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(out) == before  # config.toml and config.json included


def test_a_resume_may_switch_the_objective_when_asked_to(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--set", "ckpt_every=3", "--seed", "7", "--steps", "7",
             "--objective", "rectified_flow", "--set", "resume_changes=objective", "--out", str(out), "--resume",
             "auto"])
    recorded = json.loads((out / "checkpoints/step_00000007/meta.json").read_text())["train_config"]
    assert recorded["objective"] == "rectified_flow" and recorded["resume_changes"] == "objective"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6, 7]
    assert "rectified_flow" in (out / "config.toml").read_text()


def test_bf16_and_zero2_run(tmp_path):
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2", "--precision", "bf16", "--zero-stage", "2",
             "--out", str(tmp_path)])
    records = metrics(tmp_path)
    assert len(records) == 2 and all(r["grad_norm"] > 0 for r in records)

"""The run folder: no silent start over an earlier run, one training at a time, each step logged once."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SMALL_DIGITS, free_port, metrics, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

TRAIN = ["-m", "ditmoe.train", *SMALL_DIGITS, "--set", "ckpt_every=2", "--seed", "5", "--zero-stage", "1"]


def train(out, *args, check=True):
    return run_cli([*TRAIN, *args, "--out", str(out)], check=check, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(out, "--steps", "4")
    return out


def losses(out) -> list[tuple]:
    """(step, loss, grad_norm) of each record: what a deterministic run repeats exactly."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(out)]


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(out) -> dict:
    """Every file of the run folder but the lock file, by relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_second_run_into_a_finished_folder_is_refused_and_changes_nothing(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    proc = train(out, "--steps", "4", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: {out} already holds a run (checkpoints up to step_00000004)" in proc.stderr
    assert "--resume auto" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == before


def test_overwrite_starts_over(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    proc = train(out, "--steps", "2", "--overwrite")
    assert "--overwrite: deleted" in proc.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert losses(out) == losses(finished_run)[:2]  # the same seed: the same first steps


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    proc = train(tmp_path / "run", "--overwrite", "--resume", "auto", check=False)
    assert proc.returncode == 2 and "overwrite and resume exclude each other" in proc.stderr


def test_resume_auto_without_latest_takes_the_newest_complete_checkpoint(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "latest").unlink()
    for optim in (out / "checkpoints" / "step_00000004").glob("*optim_states.pt"):
        optim.unlink()  # step 4 as a crash during its save leaves it (ZeRO-1 on one rank)
    proc = train(out, "--steps", "4", "--resume", "auto")
    assert "newest complete checkpoint step_00000002" in proc.stdout
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_resume_auto_with_only_incomplete_checkpoints_says_it_starts_over(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002" / "meta.json").write_text("{}")
    proc = train(out, "--steps", "2", "--resume", "auto")
    assert "no complete checkpoint" in proc.stdout and "incomplete: step_00000002" in proc.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_metrics_after_a_resume_hold_each_step_once(finished_run, tmp_path):
    """A crash after step 3 was logged but before its checkpoint: the resumed run logs 3 and 4 again, so
    the records after the resumed step must be dropped first."""
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.0, "mse"')  # the torn line of a killed writer
    train(out, "--steps", "4", "--resume", "auto")
    assert losses(out) == losses(finished_run)


def hold_lock(out):
    """A process that takes the run folder's lock and sleeps (a training that is still running)."""
    code = ("import sys, time; from ditmoe.train.run_dir import RunFolder; folder = RunFolder(sys.argv[1]); "
            "folder.lock(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_training_on_a_busy_folder_is_refused_and_a_dead_holder_frees_it(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        proc = train(out, "--steps", "1", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"run folder {out} is in use by another training (pid {holder.pid} on host" in proc.stderr
        assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel releases the lock, the file stays
        holder.wait()
    assert (out / ".lock").is_file()
    train(out, "--steps", "1")
    assert [r["step"] for r in metrics(out)] == [1]


def test_every_rank_of_a_refused_distributed_run_exits(tmp_path):
    """Rank 0 holds the decision; the other rank must get the same error, not hang at a collective."""
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        start = time.monotonic()
        proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "--master_addr", "127.0.0.1", *TRAIN, "--steps", "1", "--out", str(out)],
                       check=False, env={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.count("is in use by another training") == 2, proc.stderr[-3000:]
        assert time.monotonic() - start < 240
    finally:
        holder.kill()
        holder.wait()


def test_metrics_are_strict_json_when_losses_are_not_finite(tmp_path):
    """lr=1e38 makes the loss NaN from step 2 on: those records hold null, never NaN/Infinity; the run stops
    after max_nonfinite_steps bad steps in a row with an error and no checkpoint of non-finite weights."""
    out = tmp_path / "run"
    proc = train(out, "--steps", "8", "--set", "lr=1e38", "--set", "grad_clip=1e38", "--set", "ckpt_every=8",
                 "--set", "max_nonfinite_steps=3", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: 3 consecutive steps had a NaN or infinite loss or gradient norm" in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()

    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    records = [json.loads(line, parse_constant=reject) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]  # step 4 is the third bad one: checked before logging
    assert records[0]["loss"] is not None and records[1]["loss"] is None and records[2]["nonfinite_steps"] == 1
    assert not list((out / "checkpoints").glob("step_*"))


def test_non_finite_weights_are_never_checkpointed_over_good_ones(tmp_path):
    """A checkpoint is due at every step; the weights turn NaN at step 2, before max_nonfinite_steps is reached:
    the save of step 2 is refused, and ``latest`` still names the finite step-1 checkpoint."""
    out = tmp_path / "run"
    proc = train(out, "--steps", "8", "--set", "lr=1e38", "--set", "grad_clip=1e38", "--set", "ckpt_every=1",
                 "--set", "max_nonfinite_steps=5", "--zero-stage", "0", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: the weights hold NaN or infinite values at step 2: no checkpoint written" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    ema = torch.load(out / "checkpoints" / "step_00000001" / "ema.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ema.values())

"""Fault injection: kill -9 a training at random moments, resume each time with --resume auto, and check that
the finished run equals an uninterrupted one bit for bit (losses, EMA and trained weights).

``DITMOE_KILLS`` sets the number of kills (2 in CI; raise it for a soak run, e.g. ``DITMOE_KILLS=20``),
``DITMOE_KILL_SEED`` the seed of the kill moments.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ditmoe.train.run_dir import is_complete

from conftest import REPO, SMALL_DIGITS, metrics, run_cli

STEPS = 12
TRAIN = ["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", str(STEPS), "--seed", "11", "--zero-stage", "1",
         "--set", "ckpt_every=1", "--set", "lr=3e-3"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def kill_during_training(out, rng: random.Random) -> bool:
    """Start (or resume) the run and SIGKILL it a random moment after its first step (often mid-checkpoint);
    False if it finished first."""
    proc = subprocess.Popen([sys.executable, *TRAIN, "--resume", "auto", "--out", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step "):
            time.sleep(rng.uniform(0.0, 0.4))
            break
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.stdout.close()
    proc.wait()
    return not finished


@pytest.mark.slow
def test_random_kills_resume_bit_identically(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run_cli([*TRAIN, "--out", str(reference)], env={"OMP_NUM_THREADS": "1"})
    rng = random.Random(int(os.environ.get("DITMOE_KILL_SEED", "0")))
    kills = 0
    for _ in range(int(os.environ.get("DITMOE_KILLS", "2"))):
        kills += kill_during_training(out, rng)
        latest = out / "checkpoints" / "latest"
        if latest.is_file():  # never names a checkpoint a kill left incomplete
            assert is_complete(out / "checkpoints" / latest.read_text().strip())
    assert kills >= 1
    run_cli([*TRAIN, "--resume", "auto", "--out", str(out)], env={"OMP_NUM_THREADS": "1"})

    def losses(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(run)]

    assert losses(out) == losses(reference)  # every step once, bit-identical
    last = f"checkpoints/step_{STEPS:08d}"
    for name in ("ema.pt", "mp_rank_00_model_states.pt"):
        a = torch.load(reference / last / name, map_location="cpu", weights_only=False)
        b = torch.load(out / last / name, map_location="cpu", weights_only=False)
        a, b = a.get("module", a), b.get("module", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

"""slurm/*.sbatch submitted unchanged to a real SLURM: two virtual nodes on this host, one CPU task on
each (gloo), the small configs selected through environment variables and sbatch options only."""

import subprocess
import sys
import time

import numpy as np
import pytest

from ditmoe.data.latent_format import read_manifest
from ditmoe.data.synthetic import save_tiny_vae, varied_samples, write_tar

from conftest import REPO, SMALL_DIGITS, metrics
from slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

STEPS = 60
SBATCH_ARGS = ["-N", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def tiny_env(out):
    """Overrides of the G/2 template's settings: the small digits run, fp32, default DeepSpeed config."""
    return {
        "PYTHON": sys.executable, "PRESET": "demo", "DATA": "digits", "OUT": str(out), "STEPS": str(STEPS),
        "GLOBAL_BATCH": "16", "PRECISION": "fp32", "DS_CONFIG": "", "EP_SIZE": "", "INPUT_SIZE": "",
        "EXTRA_ARGS": " ".join([*SMALL_DIGITS[SMALL_DIGITS.index("--set"):], "--set", "ckpt_every=1000"]),
    }


def submit(cluster, script, env, tmp_path, args=SBATCH_ARGS):
    return cluster.sbatch([*args, "-o", str(tmp_path / "%x-%j.out"), script], env, cwd=REPO)


def job_log(log_dir, job_id):
    (log,) = log_dir.glob(f"*-{job_id}.log")
    return log.read_text()


def completed(job):
    return job["JobState"] == "COMPLETED"


def test_templates_parse():
    for script in sorted((REPO / "slurm").glob("*")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_train_g2_completes_and_resumes_after_preemption(cluster, tmp_path):
    plain, preempted = tmp_path / "plain", tmp_path / "preempted"
    job_a = submit(cluster, "slurm/train_g2.sbatch", tiny_env(plain), tmp_path)
    job_b = submit(cluster, "slurm/train_g2.sbatch", tiny_env(preempted), tmp_path)  # after A (--exclusive)

    cluster.wait_job(job_a, completed, timeout=300)
    log_a = job_log(plain / "logs", job_a)
    assert "resolved config:" in log_a and "git " in log_a, log_a
    assert [m["step"] for m in metrics(plain)] == list(range(1, STEPS + 1)), log_a

    deadline = time.monotonic() + 300
    while len(metrics(preempted)) < 5:
        job = cluster.job(job_b)
        assert job["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, cluster.output(job)
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", job_b])
    job = cluster.wait_job(job_b, completed, timeout=300)
    log_b = job_log(preempted / "logs", job_b)
    assert job["Restarts"] == "1", log_b
    assert "preempted: saved checkpoint at step" in log_b, log_b
    saved = int(log_b.split("preempted: saved checkpoint at step ")[1].split(";")[0])
    assert 5 <= saved < STEPS, log_b
    assert f"at step {saved}" in log_b.split("resumed from ")[1].splitlines()[0], log_b

    assert [m["step"] for m in metrics(preempted)] == list(range(1, STEPS + 1))
    assert metrics(preempted)[-1]["loss"] == metrics(plain)[-1]["loss"]


def test_precompute_latents_and_sample(cluster, trained_digits_run, tmp_path):
    """Both templates at once: latents of two tiny shards on two nodes, and samples of a digits run."""
    for i in range(2):
        write_tar(tmp_path / f"part-{i}.tar", varied_samples(seed=i, bad=False))
    vae = save_tiny_vae(tmp_path / "vae")
    latents, samples, logs = tmp_path / "latents", tmp_path / "s.npz", tmp_path / "logs"
    common = {"PYTHON": sys.executable, "LOG_DIR": str(logs), "HF_HUB_OFFLINE": "1"}
    job_p = submit(cluster, "slurm/precompute_latents.sbatch", {
        **common, "INPUT": str(tmp_path / "part-{0..1}.tar"), "OUTPUT": str(latents), "RESOLUTION": "256",
        "VAE": str(vae), "DEVICE": "cpu", "EXTRA_ARGS": "--batch-size 4 --workers 1 --decoder pil",
    }, tmp_path)
    job_s = submit(cluster, "slurm/sample.sbatch", {
        **common, "CKPT": str(trained_digits_run), "NUM_SAMPLES": "4", "SAMPLES": str(samples),
        "EXTRA_ARGS": "--sampler ddim --steps 5",
    }, tmp_path, args=["--cpus-per-task=1"])
    for job in (job_p, job_s):
        cluster.wait_job(job, completed, timeout=300)
    assert "rank 0/2:" in job_log(logs, job_p) and "rank 1/2:" in job_log(logs, job_p)
    assert read_manifest(latents)["counts"]["written"] == 18
    assert np.load(samples)["arr_0"].shape[0] == 4, job_log(logs, job_s)

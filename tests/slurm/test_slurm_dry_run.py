"""The training templates' dry runs: slurm/train_*.sbatch run by bash as sbatch would start them, with
stand-ins for srun (records its command line) and scontrol, and no SLURM, GPU or data. Each must resolve
its settings to the documented run, hand srun the trainer's command, and ask for a layout the planner
says fits the GPUs it names."""

import json
import os
import re
import subprocess
import sys

import pytest

from ditmoe.model import DiTConfig
from ditmoe.parallel.planner import Layout
from ditmoe.parallel.planner_report import PlanReport

from conftest import REPO

pytestmark = pytest.mark.slow  # each dry run resolves its settings in a new interpreter

# template -> (training settings, model settings) it must resolve to with its defaults
EXPECTED = {
    "train_g2.sbatch": (
        {"preset": "DiT-MoE-G/2-16E2A", "global_batch_size": 256, "precision": "bf16", "objective": "ddpm",
         "ep_size": 8, "activation_checkpointing": 1, "deepspeed_config": "deepspeed_configs/zero3_ep.json"},
        {"input_size": 64, "num_experts": 16, "routing": "token_choice", "text_dim": 0},
    ),
    "train_ec_dit_m.sbatch": (
        {"preset": "EC-DiT-M-64E", "global_batch_size": 4096, "precision": "bf16", "objective": "rectified_flow",
         "ep_size": 8, "activation_checkpointing": 1, "deepspeed_config": "deepspeed_configs/zero3_ep.json"},
        {"input_size": 32, "num_experts": 64, "depth": 38, "routing": "expert_choice", "text_dim": 4096,
         "text_len": 120},
    ),
}
FAKE_SRUN = '#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n'
FAKE_SCONTROL = '#!/bin/bash\n[[ $1 == show ]] && echo node-1\n'


def sbatch_option(text: str, name: str) -> str:
    return re.search(rf"^#SBATCH --{name}=(\S+)$", text, re.M).group(1)


def dry_run(template: str, tmp_path) -> tuple[str, dict, list[str]]:
    """Run ``slurm/TEMPLATE`` as the batch shell of job 4242 would; (its #SBATCH text, the resolved settings it
    logged, the srun arguments)."""
    text = (REPO / "slurm" / template).read_text()
    nodes, tasks = int(sbatch_option(text, "nodes")), int(sbatch_option(text, "ntasks-per-node"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    job_name = sbatch_option(text, "job-name")
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
        "SHARED_ROOT": str(tmp_path), "SRUN_ARGS": str(tmp_path / "srun.args"), "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": job_name, "SLURM_JOB_NODELIST": f"node-[1-{nodes}]",
        "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes * tasks), "SLURM_CPUS_PER_TASK": "8",
    }
    subprocess.run(["bash", str(REPO / "slurm" / template)], env=env, cwd=tmp_path, check=True, timeout=300)
    (log,) = (tmp_path / "runs").glob(f"*/logs/{job_name}-4242.log")
    resolved = log.read_text().split("resolved config:\n")[1].splitlines()[0]
    return text, json.loads(resolved), (tmp_path / "srun.args").read_text().splitlines()


@pytest.mark.parametrize("template", list(EXPECTED))
def test_template_dry_run(template, tmp_path):
    text, resolved, srun = dry_run(template, tmp_path)
    train, model = EXPECTED[template]
    assert {key: resolved["train"][key] for key in train} == train
    assert {key: resolved["model"][key] for key in model} == model
    assert resolved["train"]["resume"] == "auto" and resolved["train"]["out"].startswith(str(tmp_path / "runs"))
    assert srun[:5] == ["--label", "--kill-on-bad-exit=1", sys.executable, "-m", "ditmoe.train"]
    assert srun[srun.index("--preset") + 1] == train["preset"]

    nodes, gpus = int(sbatch_option(text, "nodes")), int(sbatch_option(text, "gpus-per-node"))
    layout = Layout(nodes, gpus, 3, train["ep_size"], train["global_batch_size"] // (nodes * gpus),
                    train["activation_checkpointing"], "bf16")  # zero3_ep.json: ZeRO-3, bf16
    config = DiTConfig.from_dict(resolved["model"])
    report = PlanReport(train["preset"], 8 * config.input_size, config, layout)  # 80 GiB GPUs
    assert report.fits, "\n".join(report.lines())

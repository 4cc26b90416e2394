"""A steady-state training step never waits for the device, and compiled blocks train like eager ones.

Each fixture runs its tiny trainings in one subprocess (``run_recorder.py``): a ``TorchFunctionMode``
records every synchronising call with the trainer phase it ran in.
"""

import json
from pathlib import Path

import pytest

from conftest import free_port, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

RECORDER = Path(__file__).with_name("run_recorder.py")
BASE = ("data=digits,model.in_channels=1,steps=6,log_every=3,ckpt_every=6,global_batch_size=8,micro_batch_size=4,"
        "eval_samples=0,tensorboard=false,seed=1,lr=3e-3,sample_every=0,eval_every=0")
VALIDATE = "eval_every=6"  # the sync runs' last step measures the validation loss (ZeRO-1 against ZeRO-3)
KINDS = {"dense": "preset=tiny,model.num_experts=0", "token_choice": "preset=tiny", "expert_choice": "preset=tiny-ec"}
# DeepSpeed's own per-step reads (not ditmoe's): ZeRO-1/2 checks the gradient norm for inf/NaN before
# clipping (and in fp32 once more for overflow), ZeRO-3 once.
DEEPSPEED_READS = {"is_invalid_grad_norm"}


def record(tmp_path: Path, runs: dict[str, str]) -> dict:
    out = tmp_path / "runs.json"
    run_cli([str(RECORDER), str(out), *(f"{k}={v}" for k, v in runs.items())], timeout=900,
            env={"OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())})
    return json.loads(out.read_text())


def steady_syncs(run: dict) -> list[dict]:
    """Synchronising calls inside a training step or at a step boundary, after the first step."""
    return [r for r in run["syncs"] if r["phase"] in ("step", "boundary") and r["step"] >= 1]


def from_ditmoe(records: list[dict]) -> list[dict]:
    return [r for r in records if "/deepspeed/" not in r["caller"]]


@pytest.fixture(scope="module")
def sync_runs(tmp_path_factory):
    runs = {f"{kind}-zero{stage}": f"{settings},{BASE},zero_stage={stage},{VALIDATE}"
            for kind, settings in KINDS.items() for stage in (1, 3)}
    runs["token_choice-zero1-bf16"] = f"{KINDS['token_choice']},{BASE},zero_stage=1,precision=bf16"
    runs["token_choice-zero0"] = f"{KINDS['token_choice']},{BASE},zero_stage=0"
    for kind in ("token_choice", "expert_choice"):  # DeepSpeed's Triton kernels, in Triton's (slow) interpreter
        runs[f"{kind}-zero1-triton"] = f"{KINDS[kind]},{BASE},zero_stage=1,expert_gemm=triton,global_batch_size=4"
    return record(tmp_path_factory.mktemp("sync"), runs)


def test_no_host_synchronisation_in_steady_state_steps(sync_runs):
    for name, run in sync_runs.items():
        assert (run["triton_launches"] > 0) == name.endswith("-triton"), name
        assert from_ditmoe(steady_syncs(run)) == [], name
        deepspeed = {r["caller"].rsplit(" in ", 1)[1] for r in steady_syncs(run)}
        assert deepspeed <= DEEPSPEED_READS, (name, deepspeed)
        assert len(steady_syncs(run)) <= 3 * 5, name  # at most 3 per step over steps 2..6


def test_the_recorder_sees_the_reads_of_logging_and_checkpoint_steps(sync_runs):
    """Logging reads the losses (and the gradient norm), checkpointing the weights: the counter must see them."""
    for name, run in sync_runs.items():
        phases = {r["phase"] for r in from_ditmoe(run["syncs"])}
        assert {"log", "checkpoint"} <= phases, (name, phases)
        assert sorted(run["losses"]) == ["3", "6"], name


def test_validation_with_ema_weights_under_every_zero_stage(sync_runs):
    """The last step's validation loss swaps the EMA weights in (ZeRO-3: each rank its partitions, the persistent
    small parameters gathered again): ZeRO-1 and ZeRO-3 train the same weights and measure the same loss."""
    for kind in KINDS:
        one, three = sync_runs[f"{kind}-zero1"]["val_loss"], sync_runs[f"{kind}-zero3"]["val_loss"]
        assert list(one) == list(three) == ["6"], kind
        assert three["6"] == pytest.approx(one["6"], rel=1e-5), kind
        assert {r["phase"] for r in sync_runs[f"{kind}-zero3"]["syncs"]} >= {"eval"}, kind


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    runs = {}
    for kind, stage in (("dense", 1), ("token_choice", 2), ("expert_choice", 1)):
        settings = f"{KINDS[kind]},{BASE},zero_stage={stage},activation_checkpointing=1,log_every=1"
        runs[f"{kind}-zero{stage}-eager"] = settings
        runs[f"{kind}-zero{stage}-compiled"] = f"{settings},compile=true"
    zero3 = f"{KINDS['token_choice']},{BASE},zero_stage=3,activation_checkpointing=2,log_every=1"
    runs["token_choice-zero3-eager"], runs["token_choice-zero3-compiled"] = zero3, f"{zero3},compile=true"
    straight = f"{KINDS['expert_choice']},{BASE},zero_stage=1,compile=true,log_every=1,ckpt_every=3"
    runs["resume-first-half"] = f"{straight},out={tmp / 'resumed'},steps=3"
    runs["resume-second-half"] = f"{straight},out={tmp / 'resumed'},resume=auto"
    runs["resume-straight"] = straight
    return record(tmp, runs)


@pytest.mark.parametrize("name", ["dense-zero1", "token_choice-zero2", "expert_choice-zero1", "token_choice-zero3"])
def test_compiled_blocks_train_like_eager(compile_runs, name):
    eager, compiled = compile_runs[f"{name}-eager"], compile_runs[f"{name}-compiled"]
    assert eager["graphs"] == 0 and compiled["graphs"] >= 2  # forward and backward graphs, really compiled
    if "zero3" not in name:
        assert compiled["graph_breaks"] == 0  # one graph per block kind
    assert list(compiled["losses"]) == [str(s) for s in range(1, 7)]
    assert list(compiled["losses"].values()) == pytest.approx(list(eager["losses"].values()), rel=1e-4)
    assert from_ditmoe(steady_syncs(compiled)) == []


def test_resume_with_compile_is_bit_identical(compile_runs):
    first, second = compile_runs["resume-first-half"], compile_runs["resume-second-half"]
    straight = compile_runs["resume-straight"]["losses"]
    assert list(first["losses"]) == ["1", "2", "3"]
    assert {**first["losses"], **second["losses"]} == straight  # exact floats, all six steps

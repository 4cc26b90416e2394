"""Expert parallelism through DeepSpeed AutoEP: real ranks (gloo, torchrun) with ZeRO-1/2/3 and EP 1/2, token
choice and expert choice (per sample, and over each micro-batch), equal one process accumulating the same
micro-batches (loss, balance loss, expert loads, weights); 4 ranks are EP 2 x expert-data-parallel 2. The
expert-choice all-to-alls send what the planner says."""

import sys
from pathlib import Path

import pytest
import torch

from ditmoe.model import DiT, get_preset
from ditmoe.parallel.expert_parallel import autoep_config, check_ep_model, moe_param_groups, validate_ep
from ditmoe.parallel.planner import Layout, communication_per_gpu

from conftest import free_port, run_cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ep_worker  # noqa: E402

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

RUNS = {  # ZeRO stage : EP size : model (ep_worker.MODELS)
    2: ["1:2:tc", "2:1:tc", "2:2:tc", "3:1:tc", "3:2:tc", "1:2:ec", "2:2:ec", "3:2:ec", "3:1:ec", "2:2:ecbatch"],
    4: ["2:2:tc", "3:2:tc", "1:2:ec", "2:2:ec", "3:2:ec"],
}


def launch(out: Path, nproc: int) -> Path:
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), str(HERE / "ep_worker.py"), str(out), *RUNS[nproc]],
            env={"OMP_NUM_THREADS": "1"})
    return out


@pytest.fixture(scope="module")
def reference():
    return {routing: ep_worker.reference(routing) for routing in ep_worker.MODELS}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {n: launch(tmp_path_factory.mktemp(f"ranks{n}"), n) for n in RUNS}


@pytest.mark.parametrize("world,run", [(n, r) for n, runs in RUNS.items() for r in runs])
def test_equals_single_process(reference, results, world, run):
    zero, ep, routing = run.split(":")
    got = torch.load(results[world] / f"z{zero}_ep{ep}_{routing}.pt", weights_only=False)
    reference = reference[routing]
    assert got["autoep_layers"] == (2 if ep != "1" else 0)
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert got["balance"] == pytest.approx(reference["balance"], rel=1e-5)
    for a, b in zip(got["loads"], reference["loads"]):
        assert torch.equal(a, b)
    assert got["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("run", ["1:2:ec", "2:2:ecbatch"])
def test_expert_choice_traffic_is_the_planners(results, run):
    """Off-rank bytes of the expert-choice all-to-alls per micro-batch, measured, equal the planner's estimate
    (fp32, micro-batch 2, no activation checkpointing): C rows per expert per pool, dispatch and combine,
    forward and backward."""
    zero, ep, routing = run.split(":")
    got = torch.load(results[2] / f"z{zero}_ep{ep}_{routing}.pt", weights_only=False)
    layout = Layout(nodes=1, gpus_per_node=2, zero_stage=int(zero), ep_size=int(ep), micro_batch=ep_worker.MICRO_BATCH,
                    act_ckpt=0, precision="fp32")
    planned = communication_per_gpu(ep_worker.MODELS[routing], layout)["ep_all_to_all"]
    assert got["sent_per_micro_batch"] == planned > 0


def test_config_detects_our_layers_without_transformers():
    config = get_preset("tiny")
    section = autoep_config(2, config)
    assert section["moe_layer_pattern"] == r"blocks\.\d+\.mlp" and "preset_model" not in section
    assert section["route_norm"] is False and section["score_apply"] == "post"
    assert autoep_config(1, config) == {"enabled": False}


@pytest.mark.parametrize("args,match", [
    ((3, 4, 6, 2), "does not divide num_experts"),
    ((2, 4, 3, 3), "does not divide the world size"),
    ((2, 0, 2, 2), "dense"),
    ((0, 4, 2, 2), ">= 1"),
])
def test_bad_layouts(args, match):
    with pytest.raises(ValueError, match=match):
        validate_ep(*args)


def test_refused_zero3_features():
    with pytest.raises(ValueError, match="hpZ"):
        validate_ep(2, 4, 4, 3, {"zero_hpz_partition_size": 2})
    validate_ep(1, 4, 4, 3)


@pytest.mark.parametrize("changes,match", [
    ({"expert_activation": "gelu"}, "SwiGLU only"),
    ({"capacity_predictor": True}, "capacity predictor"),
])
def test_models_expert_parallelism_cannot_hold(changes, match):
    config = get_preset("tiny-ec").replace(**changes)
    with pytest.raises(ValueError, match=match):
        check_ep_model(2, config)
    check_ep_model(1, config)
    check_ep_model(2, get_preset("tiny-ec"))


def test_param_groups():
    model = DiT(get_preset("tiny"))
    dense, experts = moe_param_groups(model, 2, 3)
    assert experts["moe"] and experts["name"] == "ep_size_2" and len(experts["params"]) == 4
    assert len(dense["params"]) + 4 == len(list(model.parameters()))
    same_dense, no_ep = moe_param_groups(model, 1, 2)  # ZeRO-1/2: the same groups without EP (universal resume)
    assert "moe" not in no_ep and no_ep["params"] == experts["params"] and same_dense["params"] == dense["params"]
    assert len(moe_param_groups(model, 1, 3)) == 1
    assert len(moe_param_groups(DiT(get_preset("tiny").replace(num_experts=0)), 1, 2)) == 1

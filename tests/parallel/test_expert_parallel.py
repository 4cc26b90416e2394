"""Expert parallelism through DeepSpeed AutoEP: real ranks (gloo, torchrun) with ZeRO-1/2/3 and EP 1/2, token
choice and expert choice (per sample, and over each micro-batch), SwiGLU and GELU experts, a capacity predictor,
and the EC-DiT-tiny preset as it is, equal one process accumulating the same micro-batches (loss, balance and
predictor loss, expert loads, weights); 4 ranks are EP 2 x expert-data-parallel 2. The expert-choice all-to-alls
send what the planner says."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ditmoe.model import DiT, get_preset
from ditmoe.parallel.expert_parallel import autoep_config, check_ep_model, moe_param_groups, validate_ep
from ditmoe.parallel.planner import Layout, communication_per_gpu
from ditmoe.train.config import TrainConfig
from ditmoe.train.trainer import build_deepspeed_config
from ditmoe.weights.autoep import GELU_HALVES

from conftest import free_port, run_cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ep_worker  # noqa: E402

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

RUNS = {  # ZeRO stage : EP size : model (ep_worker.MODELS)
    2: ["1:2:tc", "2:1:tc", "2:2:tc", "3:1:tc", "3:2:tc", "1:2:ec", "2:2:ec", "3:2:ec", "3:1:ec", "2:2:ecbatch",
        "1:2:ecgelu", "2:2:ecgelu", "3:2:ecgelu", "2:2:tcgelu", "3:2:ecdit"],
    4: ["2:2:tc", "3:2:tc", "1:2:ec", "2:2:ec", "3:2:ec", "1:2:tcgelu", "3:2:ecgelu"],
}


def launch(out: Path, nproc: int) -> Path:
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), str(HERE / "ep_worker.py"), str(out), *RUNS[nproc]],
            env={"OMP_NUM_THREADS": "1"})
    return out


@pytest.fixture(scope="module")
def reference():
    return {name: ep_worker.reference(name) for name in ep_worker.MODELS}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return {n: launch(tmp_path_factory.mktemp(f"ranks{n}"), n) for n in RUNS}


@pytest.mark.parametrize("world,run", [(n, r) for n, runs in RUNS.items() for r in runs])
def test_equals_single_process(reference, results, world, run):
    zero, ep, name = run.split(":")
    got = torch.load(results[world] / f"z{zero}_ep{ep}_{name}.pt", weights_only=False)
    reference = reference[name]
    assert got["autoep_layers"] == (len(DiT(ep_worker.MODELS[name]).moe_layers()) if ep != "1" else 0)
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
    assert (section["expert_w1"], section["expert_w3"]) == ("gate_up_proj", None)
    assert section["expert_activation"] == "swiglu"
    gelu = autoep_config(2, config.replace(expert_activation="gelu"))  # the halves ep_experts.GeluExpertHalves holds
    assert (gelu["expert_w1"], gelu["expert_w3"], gelu["expert_w2"]) == ("w1", "w3", "w2")
    assert gelu["expert_activation"] == GELU_HALVES
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


def test_models_expert_parallelism_cannot_hold():
    """GELU experts reach AutoEP as the two halves of their hidden units, each a grouped GEMM of 16-byte rows: a
    width that is not a multiple of 16 is refused. GELU experts and the capacity predictor themselves run under
    EP (RUNS)."""
    narrow = get_preset("tiny-ec").replace(expert_activation="gelu", expert_ratio=1.25)  # 40 hidden units
    with pytest.raises(ValueError, match="must be a multiple of 16"):
        check_ep_model(2, narrow)
    check_ep_model(1, narrow)
    check_ep_model(2, narrow.replace(expert_activation="swiglu"))
    check_ep_model(2, get_preset("tiny-ec").replace(expert_activation="gelu", capacity_predictor=True))


@pytest.mark.parametrize("preset", ["EC-DiT-tiny", "EC-DiT-M-64E"])
def test_ec_dit_presets_take_expert_parallelism_as_they_are(preset):
    """The trainer's DeepSpeed config for an EC-DiT preset with EP and no model override reads its own GELU experts
    (EC-DiT-tiny trains so, equal to one process: "3:2:ecdit" above)."""
    config = TrainConfig(preset=preset, ep_size=2, zero_stage=3, global_batch_size=8)
    section = build_deepspeed_config(config, config.model_config(), world=2)["expert_parallel"]
    assert section["enabled"] and section["autoep_size"] == 2 and section["expert_activation"] == GELU_HALVES


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_autoep_container_computes_our_experts(activation):
    """AutoEP's container holding our experts as w1/w3/w2 (gate/up rows, or GELU's halves) computes what ours
    does: with AutoEP's own loop and the activation registered for it, and with ditmoe's grouped GEMM, the
    forward EP runs (also with AutoEP's trailing alignment rows of zeros)."""
    from deepspeed.moe.ep_experts import GroupedExperts as AutoEPExperts

    from ditmoe.model.moe import GroupedExperts
    from ditmoe.parallel.ep_experts import use_ditmoe_experts
    from ditmoe.weights import autoep

    torch.manual_seed(0)
    ours = GroupedExperts(4, 8, 16, activation)  # GELU's halves of 8 units: 16-byte rows, as check_ep_model asks
    w1, w3, w2 = autoep.experts_from_ditmoe("mlp", ours.in_proj, ours.down_proj).values()
    theirs = AutoEPExperts(8, w1.shape[1], 4, use_grouped_mm=False,
                           activation=GELU_HALVES if activation == "gelu" else "swiglu")
    for param, value in zip((theirs.w1, theirs.w3, theirs.w2), (w1, w3, w2)):
        param.data = value.detach().clone()
    x, counts = torch.randn(10, 8), torch.tensor([3, 0, 5, 2])
    expected = ours(x, counts)
    torch.testing.assert_close(theirs(x, counts), expected)
    assert use_ditmoe_experts(theirs) == 1
    torch.testing.assert_close(theirs(torch.cat([x, x.new_zeros(6, 8)]), counts)[:10], expected)


def test_threshold_routing_is_refused_under_expert_parallelism():
    """The capacity predictor's eval-mode threshold routing needs data-dependent exchanges: a clear error."""
    from ditmoe.parallel.expert_choice_ep import ExpertChoiceEPLayer

    check = ExpertChoiceEPLayer._check_routing_mode
    with pytest.raises(RuntimeError, match="one-process model"):
        check(SimpleNamespace(capacity_predictor=torch.nn.Linear(2, 2), training=False, capacity_threshold=0.5))
    check(SimpleNamespace(capacity_predictor=torch.nn.Linear(2, 2), training=True, capacity_threshold=0.5))
    check(SimpleNamespace(capacity_predictor=torch.nn.Linear(2, 2), training=False, capacity_threshold=None))


def test_param_groups():
    model = DiT(get_preset("tiny"))
    dense, experts = moe_param_groups(model, 2, 3)
    assert experts["moe"] and experts["name"] == "ep_size_2" and len(experts["params"]) == 4
    assert len(dense["params"]) + 4 == len(list(model.parameters()))
    same_dense, no_ep = moe_param_groups(model, 1, 2)  # ZeRO-1/2: the same groups without EP (universal resume)
    assert "moe" not in no_ep and no_ep["params"] == experts["params"] and same_dense["params"] == dense["params"]
    assert len(moe_param_groups(model, 1, 3)) == 1
    assert len(moe_param_groups(DiT(get_preset("tiny").replace(num_experts=0)), 1, 2)) == 1

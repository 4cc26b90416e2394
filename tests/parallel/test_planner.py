"""Planner: estimates against memory measured on CPU, partitioning arithmetic, errors."""

import json
from dataclasses import replace

import pytest
import torch

from ditmoe.diffusion import build_objective
from ditmoe.model import DiT, get_preset
from ditmoe.parallel.activation_checkpointing import apply_activation_checkpointing
from ditmoe.parallel.memory_profile import forward_backward_memory
from ditmoe.parallel.planner import (
    Layout,
    check_layout,
    communication_per_gpu,
    fitting_zero_stage,
    flops_per_gpu,
    forward_flops_per_image,
    memory_per_gpu,
    parameter_split,
    peak_memory,
    plan,
    saved_activation_bytes,
    smallest_fitting_nodes,
)

from conftest import load_tool, run_cli

REDUCED_S = get_preset("DiT-MoE-S/2-8E2A").replace(depth=2, input_size=16)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(config, micro_batch: int, act_ckpt: int) -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state of a real model, and what one training
    forward+backward allocates on top of them: held at the end of the forward, and at the peak
    (gradient buffers exist beforehand, as DeepSpeed's do)."""
    torch.manual_seed(0)
    model = DiT(config).train()
    apply_activation_checkpointing(model, act_ckpt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randn(micro_batch, config.in_channels, config.input_size, config.input_size)
    y = torch.randint(0, config.num_classes, (micro_batch,))
    allocated = forward_backward_memory(
        lambda: build_objective("ddpm").training_losses(model, x, y)["loss"].mean() + model.balance_loss())
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    return {
        "parameters": nbytes(model.parameters()) + nbytes(model.buffers()),
        "gradients": nbytes(p.grad for p in model.parameters()),
        "optimizer": nbytes(t for state in optimizer.state.values() for k, t in state.items() if k != "step"),
        "held_after_forward": allocated["held_after_forward"],
        "peak_extra": allocated["peak"],
    }


@pytest.mark.parametrize("config, micro_batch, act_ckpt", [
    pytest.param(get_preset("tiny"), 2, 0, id="tiny-2"),
    pytest.param(get_preset("tiny"), 8, 1, id="tiny-8-ckpt"),
    pytest.param(get_preset("demo"), 2, 1, id="demo-2-ckpt"),
    pytest.param(get_preset("demo"), 8, 0, id="demo-8"),
    pytest.param(get_preset("demo"), 8, 2, id="demo-8-ckpt2"),
    pytest.param(REDUCED_S, 2, 0, id="reduced-S-2"),
    pytest.param(REDUCED_S, 4, 1, id="reduced-S-4-ckpt"),
])
@pytest.mark.slow
def test_estimate_matches_measured_memory(config, micro_batch, act_ckpt):
    """Parameters + gradients + optimizer + activations within 15% of the measured peak (fp32 CPU, no ZeRO)."""
    measured = measure(config, micro_batch, act_ckpt)
    estimate = memory_per_gpu(config, Layout(1, 1, 0, 1, micro_batch, act_ckpt, "fp32"))
    for kind in ("parameters", "gradients", "optimizer"):  # exact: fp32 AdamW without ZeRO
        assert estimate[kind] == measured[kind], kind
    held = saved_activation_bytes(config, micro_batch, 4, act_ckpt)
    assert held == pytest.approx(measured["held_after_forward"], rel=0.1, abs=0.1e6)
    peak = estimate["activations"] + estimate["workspace"]
    assert peak == pytest.approx(measured["peak_extra"], rel=0.15)
    state = sum(measured[k] for k in ("parameters", "gradients", "optimizer"))
    assert state + peak == pytest.approx(state + measured["peak_extra"], rel=0.15)


# tiny (D=32, depth 2, 4 experts of width F=128, shared width 64), counted by hand
TINY_EXPERT = 2 * 4 * 3 * 128 * 32  # 98304
# qkv, proj, adaLN, router, shared
TINY_BLOCK_DENSE = 32 * 96 + 96 + 32 * 32 + 32 + 32 * 192 + 192 + 32 * 4 + 3 * 64 * 32
TINY_DENSE = (
    4 * 2 * 2 * 32 + 32  # patch embedding
    + 256 * 32 + 32 + 32 * 32 + 32  # timestep MLP
    + 11 * 32  # label table with the null class
    + 2 * TINY_BLOCK_DENSE
    + 32 * 32 + 32 + 32 * 64 + 64  # final linear and adaLN
)  # 47008
TINY_BUFFERS = 16 * 32  # positional table
# world 8, EP 2 (expert-data-parallel 4): dense / 8 + experts / 2 / 4 = 5876 + 12288
TINY_LOCAL, TINY_PARTITION = TINY_DENSE + TINY_EXPERT // 2, TINY_DENSE / 8 + TINY_EXPERT / 8


def tiny_layout(zero, precision="bf16", act_ckpt=0):
    return Layout(nodes=2, gpus_per_node=4, zero_stage=zero, ep_size=2, micro_batch=3, act_ckpt=act_ckpt,
                  precision=precision)


def test_parameter_split_of_tiny():
    split = parameter_split(get_preset("tiny"))
    assert (split["expert"], split["dense"], split["buffers"]) == (TINY_EXPERT, TINY_DENSE, TINY_BUFFERS)
    assert (split["block_expert"], split["block_dense"]) == (TINY_EXPERT / 2, TINY_BLOCK_DENSE)
    assert split["tensor_expert"] == 4 * 256 * 32  # gate_up_proj (E, 2F, D)


@pytest.mark.parametrize("zero, params, grads, optimizer", [
    (0, TINY_LOCAL, TINY_LOCAL, TINY_LOCAL),
    (1, TINY_LOCAL, TINY_LOCAL, TINY_PARTITION),
    (2, TINY_LOCAL, TINY_PARTITION, TINY_PARTITION),
    (3, TINY_PARTITION, TINY_PARTITION, TINY_PARTITION),
])
def test_zero_and_expert_partitioning(zero, params, grads, optimizer):
    memory = memory_per_gpu(get_preset("tiny"), tiny_layout(zero))
    assert memory["parameters"] == 2 * params + 2 * TINY_BUFFERS  # bf16
    assert memory["gradients"] == 2 * grads
    assert memory["optimizer"] == 16 * optimizer  # fp32 master, its gradient, two moments
    assert memory["ema"] == 4 * (TINY_PARTITION if zero == 3 else TINY_LOCAL)  # what this rank holds, fp32
    result = plan(get_preset("tiny"), tiny_layout(zero))
    largest = 4 * 128 * 32  # one expert weight of all 4 experts (E, F, D): gathered one at a time
    assert result["ema_export"] == 4 * largest
    persistent = sum(memory[k] for k in ("parameters", "gradients", "optimizer", "ema"))
    assert result["memory_checkpoint_total"] == persistent + 4 * largest
    # two gathered blocks at ZeRO-3: block dense parameters and this rank's 2 of 4 experts
    block = TINY_BLOCK_DENSE + TINY_EXPERT / 2 / 2
    assert memory["zero3_gathered"] == (2 * 2 * block if zero == 3 else 0)


def test_fp32_master_copy():
    """fp32 keeps no extra master copy without ZeRO or at ZeRO-3; DeepSpeed's ZeRO-1/2 clone the partition."""
    per_param = [memory_per_gpu(get_preset("tiny"), tiny_layout(z, "fp32"))["optimizer"] for z in range(4)]
    assert per_param == [8 * TINY_LOCAL, 16 * TINY_PARTITION, 16 * TINY_PARTITION, 8 * TINY_PARTITION]


def test_communication_volume():
    tiny = get_preset("tiny")
    tokens = 3 * 16
    per_pass = tokens * 2 * 32 * 2 * (1 / 2) * 2  # tokens × k × D × bf16 × off-rank share × (dispatch + combine)
    dense, expert = 2 * TINY_DENSE * 7 / 8, 2 * TINY_EXPERT / 2 * 3 / 4  # ring all-gather share of each group
    comm = communication_per_gpu(tiny, tiny_layout(3))
    assert comm["ep_all_to_all"] == pytest.approx(2 * 2 * per_pass)  # forward and backward, 2 MoE layers
    assert comm["zero3_param_all_gather"] == pytest.approx(2 * (dense + expert))
    assert comm["grad_reduce_scatter"] == pytest.approx(dense + expert)
    assert comm["param_all_gather_after_step"] == 0
    ckpt = communication_per_gpu(tiny, tiny_layout(3, act_ckpt=1))
    assert ckpt["ep_all_to_all"] == pytest.approx(2 * 3 * per_pass)  # recomputation dispatches again
    assert ckpt["zero3_param_all_gather"] == pytest.approx(3 * (dense + expert))
    zero2 = communication_per_gpu(tiny, tiny_layout(2))
    assert zero2["zero3_param_all_gather"] == 0
    assert zero2["param_all_gather_after_step"] == pytest.approx(dense + expert)


def test_flops():
    tiny = get_preset("tiny")
    forward = forward_flops_per_image(tiny)
    assert flops_per_gpu(tiny, tiny_layout(3)) == 3 * 3 * forward  # micro-batch 3, forward + backward
    assert flops_per_gpu(tiny, tiny_layout(3, act_ckpt=1)) == 4 * 3 * forward


@pytest.mark.parametrize("preset, changes, message", [
    ("tiny", {"ep_size": 3}, r"--ep-size 3 does not divide the number of experts \(4\)"),
    ("tiny", {"ep_size": 4, "nodes": 1, "gpus_per_node": 2}, r"--ep-size 4 does not divide the world size 2"),
    ("tiny-gelu", {}, r"splits each GELU expert's hidden units .* expert width 8 .* must be a multiple of 16"),
    ("DiT-S/2", {}, r"--ep-size 2 needs a mixture-of-experts preset"),
    ("tiny", {"micro_batch": 0}, r"--micro-batch-size 0 must be >= 1"),
])
def test_layout_errors(preset, changes, message):
    layout = Layout(**{**vars(tiny_layout(3)), **changes})
    gelu = get_preset("tiny").replace(expert_activation="gelu", expert_ratio=0.25)  # experts 8 units wide
    config = gelu if preset == "tiny-gelu" else get_preset(preset)
    with pytest.raises(ValueError, match=message):
        check_layout(config, layout)


G2_ARGS = ["--preset", "DiT-MoE-G/2-16E2A", "--nodes", "8", "--gpus-per-node", "8", "--zero", "3", "--ep-size", "8",
           "--micro-batch", "16", "--act-ckpt", "--image-size", "512"]


def test_cli():
    out = run_cli(["tools/plan.py", *G2_ARGS]).stdout
    assert "1024 tokens" in out and "EP 8: 2 of 16 experts per rank" in out and "fits in 80 GB: yes" in out


@pytest.mark.parametrize("changes, message", [
    (["--preset", "DiT-MoE-X/2"], "--preset: unknown preset 'DiT-MoE-X/2'"),
    (["--ep-size", "3"], "--ep-size 3 does not divide the number of experts (16)"),
    (["--gpus-per-node", "3", "--ep-size", "16"],
     "--ep-size 16 does not divide the world size 24 (--nodes 8 x --gpus-per-node 3)"),
    (["--image-size", "500"], "--image-size 500 must be a multiple of 8 x patch size = 16"),
])
def test_cli_errors(changes, message, capsys):
    tool = load_tool("plan")
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*G2_ARGS, *changes])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fitting_zero_stage_is_the_lowest_that_fits():
    """One rank: 0. Several: the lowest stage whose planned step memory fits 90% of the device (1 if unknown)."""
    small, xl = get_preset("DiT-MoE-S/2-8E2A"), get_preset("DiT-MoE-XL/2-8E2A")
    common = {"micro_batch": 32, "act_ckpt": 0, "precision": "bf16"}
    assert fitting_zero_stage(xl, world=1, device_bytes=80 * 2**30, **common) == 0
    assert fitting_zero_stage(xl, world=8, device_bytes=None, **common) == 1
    assert fitting_zero_stage(small, world=8, device_bytes=80 * 2**30, **common) == 1
    totals = {stage: sum(memory_per_gpu(xl, Layout(1, 8, stage, 1, 32, 0, "bf16")).values()) for stage in (1, 2, 3)}
    assert totals[1] > totals[2] > totals[3]
    for stage in (1, 2, 3):  # a device just large enough for each stage gets that stage
        assert fitting_zero_stage(xl, world=8, device_bytes=int(totals[stage] / 0.9) + 1, **common) == stage
    assert fitting_zero_stage(xl, world=8, device_bytes=2**30, **common) == 3  # nothing fits: the most partitioned


# EC-DiT-M-64E counted by hand: D = 3072, 38 blocks (19 MoE), 48 heads, 12 KV heads of 64 (K/V width 768),
# 64 GELU experts of F = 4D, captions of 120 tokens of width 4096, 4 output channels.
M_D, M_KV, M_F = 3072, 768, 4 * 3072
M_EXPERT = 19 * 64 * 2 * M_F * M_D  # up and down projections, no biases
M_ATTENTION = M_D * M_D + M_D + M_D * 2 * M_KV + 2 * M_KV + M_D * M_D + M_D  # q, kv, proj
M_BLOCK = 6 * M_D * M_D + 6 * M_D + 2 * M_ATTENTION  # adaLN, self- and cross-attention
M_DENSE = (
    4 * 2 * 2 * M_D + M_D  # patch embedding
    + 256 * M_D + M_D + M_D * M_D + M_D  # timestep MLP
    + 4096 * M_D + M_D + M_D * M_D + M_D + 120 * 4096  # caption projection, null caption
    + 38 * M_BLOCK + 19 * (2 * M_D * M_F + M_F + M_D) + 19 * M_D * 64  # blocks, dense MLPs, routers
    + 2 * M_D * M_D + 2 * M_D + M_D * 16 + 16  # final adaLN and linear
)
M_LAYOUT = Layout(nodes=4, gpus_per_node=8, zero_stage=3, ep_size=8, micro_batch=64, act_ckpt=1, precision="bf16")


def test_ec_dit_m_64e_partitioned_by_hand():
    """ZeRO-3 with EP 8 on 4 nodes of 8: dense parameters over 32 ranks, the 8 local experts over the 4 ranks
    that hold them."""
    config = get_preset("EC-DiT-M-64E")
    split = parameter_split(config)
    assert (split["expert"], split["dense"], split["buffers"]) == (M_EXPERT, M_DENSE, 256 * M_D)
    assert M_EXPERT == 91_804_925_952 and M_DENSE == 5_436_235_792
    local = M_DENSE / 32 + M_EXPERT / 8 / 4  # 3,038,786,304.5 parameters on each rank
    memory = memory_per_gpu(config, M_LAYOUT)
    assert memory["parameters"] == 2 * local + 2 * 256 * M_D  # bf16; the positional table whole
    assert memory["gradients"] == 2 * local
    assert memory["optimizer"] == 16 * local  # 45.28 GiB: fp32 master, its gradient, two moments
    assert memory["ema"] == 4 * local
    # two gathered blocks: an MoE block's dense parameters and its 8 local experts
    assert memory["zero3_gathered"] == 2 * 2 * (M_BLOCK + M_D * 64 + 8 * 2 * M_F * M_D)


@pytest.mark.slow
def test_smallest_fitting_nodes():
    config = get_preset("EC-DiT-M-64E")
    peaks = {n: peak_memory(plan(config, replace(M_LAYOUT, nodes=n))) / 2**30 for n in (3, 4, 5)}
    assert peaks[3] > 80 >= peaks[4] and peaks[4] > 72 >= peaks[5]
    assert smallest_fitting_nodes(config, M_LAYOUT, 80 * 2**30, max_nodes=16) == 4
    assert smallest_fitting_nodes(config, M_LAYOUT, 72 * 2**30, max_nodes=16) == 5
    assert smallest_fitting_nodes(config, M_LAYOUT, 8 * 2**30, max_nodes=16) is None


def test_smallest_fitting_nodes_skips_worlds_ep_does_not_divide():
    layout = Layout(nodes=1, gpus_per_node=3, zero_stage=3, ep_size=2, micro_batch=1)  # 1 node: world 3
    assert smallest_fitting_nodes(get_preset("tiny"), layout, 2**40, max_nodes=4) == 2
    with pytest.raises(ValueError, match="--ep-size 3 does not divide the number of experts"):
        smallest_fitting_nodes(get_preset("tiny"), replace(layout, ep_size=3), 2**40, max_nodes=4)


EC_M_ARGS = ["--preset", "EC-DiT-M-64E", "--gpus-per-node", "8", "--zero-stage", "3", "--ep-size", "8",
             "--micro-batch-size", "64", "--activation-checkpointing"]


@pytest.mark.slow
def test_cli_find_nodes(capsys):
    tool = load_tool("plan")
    tool.main([*EC_M_ARGS, "--find-nodes", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    assert out.startswith("smallest node count that fits 80 GiB per GPU: 4 (32 GPUs); 3 nodes need 101.83 GiB\n")
    assert "4 nodes x 8 GPUs = 32 ranks" in out and "fits in 80 GB: yes" in out
    tool.main([*EC_M_ARGS, "--find-nodes", "--gpu-memory-gib", "80", "--json"])
    assert json.loads(capsys.readouterr().out)["smallest_fitting_nodes"] == 4
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*EC_M_ARGS, "--find-nodes", "3"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().out.startswith("no node count up to 3 fits 80 GiB per GPU: 3 nodes need 101.83 GiB")


@pytest.mark.parametrize("extra", [[], ["--nodes", "4", "--find-nodes"]])
def test_cli_needs_nodes_or_find_nodes(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("plan").main([*EC_M_ARGS, *extra])
    assert exit_info.value.code == 2 and "give one of --nodes and --find-nodes" in capsys.readouterr().err

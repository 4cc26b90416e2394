"""Plan a training layout: per-GPU memory, FLOPs and communication per step, without allocating the model.

    python tools/plan.py --preset DiT-MoE-G/2-16E2A --nodes 8 --gpus-per-node 8 --zero 3 --ep-size 8 \\
        --micro-batch 16 --act-ckpt --precision bf16 --image-size 512 [--json]

One step = one micro-batch per GPU (global batch = micro-batch × world size). All numbers are estimates
(docs/planner.md explains the model and its validation).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.model import get_preset  # noqa: E402
from ditmoe.parallel.planner import Layout, plan  # noqa: E402

GIB = 2**30
MEMORY_LINES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer": "optimizer (fp32 master, its grads, moments)",
    "ema": "EMA (fp32, this rank's part)",
    "zero3_gathered": "ZeRO-3 gathered parameters (2 blocks)",
    "activations": "activations",
    "workspace": "backward workspace",
}
COMM_LINES = {
    "ep_all_to_all": "EP all-to-all (dispatch + combine)",
    "zero3_param_all_gather": "ZeRO-3 parameter all-gathers",
    "grad_reduce_scatter": "gradient reduce-scatter",
    "param_all_gather_after_step": "parameter all-gather after the step",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="model preset (tools/model_card.py --list)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--zero", type=int, required=True, choices=(0, 1, 2, 3), help="ZeRO stage")
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel group size (1: off)")
    parser.add_argument("--micro-batch", type=int, required=True, help="images per GPU per step")
    parser.add_argument("--act-ckpt", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="activation checkpointing of every N-th block (flag alone: every block)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--image-size", type=int, default=256, help="pixels; latents are 8x smaller")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default: A100-80GB)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        config = get_preset(args.preset)
    except ValueError as err:
        parser.error(f"--preset: {err}")
    if args.image_size % (8 * config.patch_size):
        parser.error(f"--image-size {args.image_size} must be a multiple of 8 x patch size = {8 * config.patch_size}")
    config = config.replace(input_size=args.image_size // 8)
    layout = Layout(args.nodes, args.gpus_per_node, args.zero, args.ep_size, args.micro_batch,
                    args.act_ckpt, args.precision)
    try:
        result = plan(config, layout)
    except ValueError as err:
        parser.error(str(err))
    return args, config, layout, result


def describe(args, config, layout: Layout, result: dict) -> list[str]:
    params, memory, comm = result["params"], result["memory"], result["communication"]
    step, ckpt_total = result["memory_step_total"] / GIB, result["memory_checkpoint_total"] / GIB
    fits = "yes" if max(step, ckpt_total) <= args.gpu_memory else "no"
    ckpt = {0: "off", 1: "every block"}.get(layout.act_ckpt, f"every {layout.act_ckpt}-th block")
    experts = (f"EP {layout.ep_size}: {config.num_experts // layout.ep_size} of {config.num_experts} experts per rank, "
               f"expert-data-parallel {layout.expert_dp}" if layout.ep_size > 1 else "no EP")
    flops, total_params = result["flops_per_gpu"], params["expert"] + params["dense"]
    size = config.input_size
    return [
        f"{args.preset} at {args.image_size}x{args.image_size} ({config.in_channels}x{size}x{size} latents, "
        f"{config.num_tokens} tokens): {total_params / 1e9:.2f}B parameters ({params['expert'] / 1e9:.2f}B in "
        f"routed experts), {result['params_activated'] / 1e9:.2f}B activated",
        f"layout: {layout.nodes} nodes x {layout.gpus_per_node} GPUs = {layout.world} ranks, ZeRO-{layout.zero_stage}, "
        f"{experts}, {layout.precision}, micro-batch {layout.micro_batch} "
        f"(global {layout.micro_batch * layout.world}), activation checkpointing {ckpt}",
        "memory per GPU (GiB)",
        *(f"  {label:<45} {memory[key] / GIB:8.2f}" for key, label in MEMORY_LINES.items()),
        f"  {'training step total':<45} {step:8.2f}",
        f"  {'EMA export at each checkpoint (device peak)':<45} {result['ema_export'] / GIB:8.2f}   "
        "note: gathered one parameter at a time to rank 0's host memory",
        f"  {'checkpoint total (persistent state + export)':<45} {ckpt_total:8.2f}   "
        "parameters, gradients, optimizer, EMA, export",
        f"  fits in {args.gpu_memory:g} GB: {fits} (CUDA context, NCCL buffers and fragmentation not included)",
        f"compute per step: {flops / 1e12:.1f} TFLOPs per GPU, {flops * layout.world / 1e15:.2f} PFLOPs in all "
        f"(forward + backward{' + recomputation' if layout.act_ckpt else ''})",
        "communication per GPU per step (GB sent)",
        *(f"  {label:<45} {comm[key] / 1e9:8.2f}" for key, label in COMM_LINES.items()),
        f"  {'total':<45} {sum(comm.values()) / 1e9:8.2f}",
        "all numbers are estimates (docs/planner.md)",
    ]


def main(argv=None):
    args, config, layout, result = parse_args(argv)
    if args.json:
        fits = max(result["memory_step_total"], result["memory_checkpoint_total"]) <= args.gpu_memory * GIB
        print(json.dumps({"preset": args.preset, "image_size": args.image_size, "layout": vars(layout), **result,
                          "fits": fits}, indent=2))
        return
    print("\n".join(describe(args, config, layout, result)))


if __name__ == "__main__":
    main()

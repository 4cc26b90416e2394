"""Plan a training layout: per-GPU memory, FLOPs and communication per step, without allocating the model.

    python tools/plan.py --preset DiT-MoE-G/2-16E2A --nodes 8 --gpus-per-node 8 --zero-stage 3 --ep-size 8 \\
        --micro-batch-size 16 --activation-checkpointing --precision bf16 --resolution 512 [--json]
    python tools/plan.py --preset EC-DiT-M-64E --find-nodes --gpu-memory-gib 80 --gpus-per-node 8 \\
        --zero-stage 3 --ep-size 8 --micro-batch-size 64 --activation-checkpointing

One step = one micro-batch per GPU (global batch = micro-batch × world size). --find-nodes replaces --nodes:
it prints the smallest node count whose training step and checkpoint fit --gpu-memory-gib, then its plan
(exit status 1 if none up to MAX does). All numbers are estimates (docs/planner.md explains the model and
its validation).
"""

import argparse
import json
import math
from dataclasses import replace

from ditmoe.cli import Positive, make_parser
from ditmoe.model import get_preset
from ditmoe.parallel.planner import Layout, peak_memory, plan, smallest_fitting_nodes
from ditmoe.parallel.planner_report import GIB, PlanReport

MAX_NODES = 256  # --find-nodes without a value searches up to this many nodes


def finite(text: str) -> float:
    """``text`` as a float; anything else, NaN or infinity included, is a usage error naming the flag."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--preset", required=True, help="model preset (tools/model_card.py --list)")
    p.add_argument("--nodes", action=Positive, help="number of nodes (or --find-nodes)")
    p.add_argument("--find-nodes", action=Positive, nargs="?", const=MAX_NODES, metavar="MAX",
                   help=f"instead of --nodes: the smallest node count up to MAX (default {MAX_NODES}) that fits "
                        "--gpu-memory-gib, and its plan")
    p.add_argument("--gpus-per-node", action=Positive, required=True, help="GPUs (ranks) per node")
    p.add_argument("--zero-stage", type=int, required=True, choices=(0, 1, 2, 3), aliases=["--zero"],
                   help="ZeRO stage")
    p.add_argument("--ep-size", action=Positive, default=1, help="expert-parallel group size (1: off)")
    p.add_argument("--micro-batch-size", action=Positive, required=True, aliases=["--micro-batch"],
                   help="images per GPU per step")
    p.add_argument("--activation-checkpointing", type=int, nargs="?", const=1, default=0, metavar="N",
                   aliases=["--act-ckpt"],
                   help="activation checkpointing of every N-th block (flag alone: every block)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="training precision")
    p.add_argument("--resolution", action=Positive, default=256, aliases=["--image-size"],
                   help="image size in pixels; latents are 8x smaller")
    p.add_argument("--gpu-memory-gib", action=Positive, type=finite, default=80.0, aliases=["--gpu-memory"],
                   help="GiB per GPU (default: A100-80GB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parse_args(argv=None) -> tuple[PlanReport, argparse.Namespace]:
    """(the report of the command line's plan, the arguments); a layout the trainer cannot run is a usage
    error. With --find-nodes the report's node count is the smallest that fits, or MAX if none does."""
    p = build_parser()
    args = p.parse_args(argv)
    if (args.nodes is None) == (args.find_nodes is None):
        p.error("give one of --nodes and --find-nodes")
    try:
        config = get_preset(args.preset)
    except ValueError as err:
        p.error(f"--preset: {err}")
    if args.resolution % (8 * config.patch_size):
        p.error(f"{p.as_typed('--resolution')} {args.resolution} must be a multiple of 8 x patch size = "
                f"{8 * config.patch_size}")
    config = config.replace(input_size=args.resolution // 8)
    layout = Layout(args.nodes or 1, args.gpus_per_node, args.zero_stage, args.ep_size, args.micro_batch_size,
                    args.activation_checkpointing, args.precision)
    try:
        if args.find_nodes:
            found = smallest_fitting_nodes(config, layout, args.gpu_memory_gib * GIB, args.find_nodes)
            layout = replace(layout, nodes=found or largest_nodes(layout, args.find_nodes))
        report = PlanReport(args.preset, args.resolution, config, layout, args.gpu_memory_gib)
        report.result  # computed here, so that a layout the trainer cannot run is a usage error
    except ValueError as err:
        p.error(str(err))
    return report, args


def largest_nodes(layout: Layout, max_nodes: int) -> int:
    """The most nodes, at most ``max_nodes``, whose world size the EP size divides (``max_nodes`` if none)."""
    valid = [n for n in range(1, max_nodes + 1) if n * layout.gpus_per_node % layout.ep_size == 0]
    return max(valid, default=max_nodes)


def search_line(report: PlanReport, max_nodes: int) -> str:
    """What --find-nodes found: the node count and what one node fewer would need."""
    layout, gib = report.layout, report.gpu_memory
    if not report.fits:
        return (f"no node count up to {max_nodes} fits {gib:g} GiB per GPU: {layout.nodes} nodes need "
                f"{peak_memory(report.result) / GIB:.2f} GiB")
    line = f"smallest node count that fits {gib:g} GiB per GPU: {layout.nodes} ({layout.world} GPUs)"
    fewer = replace(layout, nodes=layout.nodes - 1)
    if fewer.nodes and fewer.world % fewer.ep_size == 0:
        line += f"; {fewer.nodes} nodes need {peak_memory(plan(report.config, fewer)) / GIB:.2f} GiB"
    return line


def main(argv=None):
    report, args = parse_args(argv)
    if args.json:
        found = {"smallest_fitting_nodes": report.layout.nodes if report.fits else None} if args.find_nodes else {}
        print(json.dumps({**report.to_json(), **found}, indent=2))
    else:
        lines = report.lines()
        print("\n".join([search_line(report, args.find_nodes), *lines] if args.find_nodes else lines))
    if args.find_nodes and not report.fits:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Plan a training layout: per-GPU memory, FLOPs and communication per step, without allocating the model.

    python tools/plan.py --preset DiT-MoE-G/2-16E2A --nodes 8 --gpus-per-node 8 --zero-stage 3 --ep-size 8 \\
        --micro-batch-size 16 --activation-checkpointing --precision bf16 --resolution 512 [--json]

One step = one micro-batch per GPU (global batch = micro-batch × world size). All numbers are estimates
(docs/planner.md explains the model and its validation).
"""

import argparse
import json
import math

from ditmoe.cli import Positive, make_parser
from ditmoe.model import get_preset
from ditmoe.parallel.planner import Layout
from ditmoe.parallel.planner_report import PlanReport


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
    p.add_argument("--nodes", action=Positive, required=True, help="number of nodes")
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
    p.add_argument("--gpu-memory", action=Positive, type=finite, default=80.0,
                   help="GiB per GPU (default: A100-80GB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parse_args(argv=None) -> tuple[PlanReport, bool]:
    """(the report of the command line's plan, whether to print JSON); a layout the trainer cannot run is a
    usage error."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = get_preset(args.preset)
    except ValueError as err:
        p.error(f"--preset: {err}")
    if args.resolution % (8 * config.patch_size):
        p.error(f"{p.as_typed('--resolution')} {args.resolution} must be a multiple of 8 x patch size = "
                f"{8 * config.patch_size}")
    layout = Layout(args.nodes, args.gpus_per_node, args.zero_stage, args.ep_size, args.micro_batch_size,
                    args.activation_checkpointing, args.precision)
    report = PlanReport(args.preset, args.resolution, config.replace(input_size=args.resolution // 8), layout,
                        args.gpu_memory)
    try:
        report.result  # computed here, so that a layout the trainer cannot run is a usage error
    except ValueError as err:
        p.error(str(err))
    return report, args.json


def main(argv=None):
    report, as_json = parse_args(argv)
    print(json.dumps(report.to_json(), indent=2) if as_json else "\n".join(report.lines()))


if __name__ == "__main__":
    main()

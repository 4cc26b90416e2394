"""Expert-routing analysis of a DiT-MoE checkpoint (paper §3.3, Figures 5-7).

    python tools/analyze_routing.py --ckpt runs/demo --samples-per-class 10 --out routing/ \\
        [--sampler ddpm|ddim] [--steps 50] [--cfg-scale 1.5] [--weights ema|model] [--seed 0]

Samples N images of every class while recording each token's experts in every MoE layer at every
sampling step, then writes to OUT: ``routing_stats.npz`` (raw counts, see
``ditmoe.analysis.RoutingStats``), ``routing_stats.json`` (settings and per-layer summary: expert
loads, experts per token, the experts most specialised by class, step and patch position) and PNG
heatmaps: ``overview.png`` and ``block{b}_class.png``, ``block{b}_step.png``, ``block{b}_position.png``
for each MoE block. Batch b starts from noise seeded by ``seed + b``, as in tools/sample.py.
"""

from ditmoe.analysis.routing_run import analyze_routing
from ditmoe.cli import Positive, make_parser, user_errors


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    p.add_argument("--samples-per-class", action=Positive, required=True, help="images sampled of every class")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="> 1 also records the unconditional (null) half")
    p.add_argument("--sampler", help="ddpm (default for DDPM models) | ddim | euler (rectified flow)")
    p.add_argument("--steps", action=Positive, help="sampling steps (default: 250 ddpm, 50 ddim/euler)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (default) or trained weights")
    p.add_argument("--batch-size", action=Positive, default=250, help="samples per batch (default 250)")
    p.add_argument("--seed", type=int, default=0, help="batch b starts from noise seeded by SEED + b")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors():
        written = analyze_routing(args.ckpt, args.out, args.samples_per_class, cfg_scale=args.cfg_scale,
                                  sampler=args.sampler, steps=args.steps, weights=args.weights,
                                  batch_size=args.batch_size, seed=args.seed)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

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

import argparse
import inspect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.analysis import RoutingRecorder  # noqa: E402
from ditmoe.analysis.routing_plots import save_routing_plots  # noqa: E402
from ditmoe.diffusion import build_objective  # noqa: E402
from ditmoe.inference import load_model  # noqa: E402
from ditmoe.sampling import balanced_labels, generate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    p.add_argument("--samples-per-class", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="> 1 also records the unconditional (null) half")
    p.add_argument("--sampler", help="ddpm (default for DDPM models) | ddim | euler (rectified flow)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 250 ddpm, 50 ddim/euler)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for name in ("samples_per_class", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {value}")
    try:
        model, meta = load_model(args.ckpt, weights=args.weights)
        if not model.config.is_moe:
            sys.exit(f"error: checkpoint {args.ckpt} is a dense model (num_experts=0): no MoE layers to analyse")
        objective = build_objective(meta["train_config"]["objective"])
        sampler = args.sampler or inspect.signature(objective.sample).parameters["sampler"].default
        labels = balanced_labels(args.samples_per_class * model.config.num_classes, model.config.num_classes)
        with RoutingRecorder(model) as recorder:
            for b, y in enumerate(labels.split(args.batch_size)):
                recorder.start_run()
                generate(model, objective, y, cfg_scale=args.cfg_scale, sampler=sampler, steps=args.steps,
                         batch_size=len(y), seed=args.seed + b, progress=True)
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"error: {err}")
    stats = recorder.stats()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats.save_npz(out / "routing_stats.npz")
    preset = meta["train_config"]["preset"]
    settings = {"ckpt": str(args.ckpt), "preset": preset, "objective": meta["train_config"]["objective"],
                "sampler": sampler, "steps": len(stats.step_timesteps), "cfg_scale": args.cfg_scale,
                "weights": args.weights, "seed": args.seed, "samples_per_class": args.samples_per_class}
    (out / "routing_stats.json").write_text(json.dumps({"settings": settings, **stats.summary()}, indent=1) + "\n")
    print(f"wrote {out / 'routing_stats.npz'} and {out / 'routing_stats.json'}")
    title = f"{preset} ({len(labels)} samples, {sampler} {len(stats.step_timesteps)} steps, cfg {args.cfg_scale:g})"
    for path in save_routing_plots(stats, out, title):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

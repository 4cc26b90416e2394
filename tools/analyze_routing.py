"""Expert-routing analysis of a DiT-MoE checkpoint (paper §3.3, Figures 5-7) or of a text-conditioned
EC-DiT checkpoint (its adaptive compute: how many experts process each image token).

    python tools/analyze_routing.py --ckpt runs/demo --samples-per-class 10 --out routing/ \\
        [--sampler ddpm|ddim] [--steps 50] [--cfg-scale 1.5] [--weights ema|model] [--seed 0]
    python tools/analyze_routing.py --ckpt runs/demo-t2i --prompt "the digit 7" [--prompt ...] \\
        [--prompts FILE] [--samples-per-prompt 1] [--text-encoder PATH --text-max-length N] \\
        [--map-steps 5] --out routing/

Class-conditional models: samples N images of every class while recording each token's experts in every
MoE layer at every sampling step, then writes to OUT: ``routing_stats.npz`` (raw counts, see
``ditmoe.analysis.RoutingStats``), ``routing_stats.json`` (settings and per-layer summary: expert
loads, experts per token, the experts most specialised by class, step and patch position) and PNG
heatmaps: ``overview.png`` and ``block{b}_class.png``, ``block{b}_step.png``, ``block{b}_position.png``
for each MoE block.

Text-conditioned models (prompts as in tools/sample.py; the text encoder defaults to the one the
checkpoint records): samples ``--samples-per-prompt`` images of every prompt and writes
``adaptive_compute.npz`` (``experts_per_token`` (steps, layers, N, H_tokens, W_tokens): experts that took
each image token; ``unprocessed_fraction`` (steps, layers): share of tokens no expert took; the samples and
prompts), ``adaptive_compute.json`` (settings, ``unprocessed_fraction`` [step][layer], per layer and per
prompt summaries) and ``adaptive_compute_prompt{p}.png`` per prompt (rows: MoE layers, columns: a few
sampling steps and their mean, the count heat map blended over the prompt's first sample); the
unprocessed fractions are printed.

Batch b starts from noise seeded by ``seed + b``, as in tools/sample.py.
"""

from ditmoe.analysis.adaptive_compute_plots import MAP_STEPS
from ditmoe.analysis.routing_run import analyze_routing
from ditmoe.cli import Positive, make_parser, user_errors


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    p.add_argument("--samples-per-class", action=Positive,
                   help="class-conditional models (required for them): images sampled of every class")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="> 1 also records the unconditional (null) half")
    p.add_argument("--sampler", help="ddpm (default for DDPM models) | ddim | euler (rectified flow)")
    p.add_argument("--steps", action=Positive, help="sampling steps (default: 250 ddpm, 50 ddim/euler)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (default) or trained weights")
    p.add_argument("--batch-size", action=Positive, default=250, help="samples per batch (default 250)")
    p.add_argument("--seed", type=int, default=0, help="batch b starts from noise seeded by SEED + b")
    p.add_argument("--device", default="cpu", help="device to sample on (default cpu), e.g. cuda")
    text = p.add_argument_group("text-conditioned models (adaptive compute)")
    text.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                      help="a prompt (repeatable); samples cycle through the prompts")
    text.add_argument("--prompts", dest="prompts_file", metavar="FILE",
                      help="a file of prompts, one per line (after any --prompt)")
    text.add_argument("--samples-per-prompt", action=Positive, default=1, help="images sampled of every prompt "
                                                                               "(default 1)")
    text.add_argument("--text-encoder", metavar="PATH_OR_ID",
                      help="text encoder for the prompts (default: the one the checkpoint records)")
    text.add_argument("--text-max-length", action=Positive,
                      help="caption tokens (default: the checkpoint's, else the model's text_len)")
    text.add_argument("--map-steps", action=Positive, default=MAP_STEPS,
                      help=f"sampling steps shown in each PNG, evenly spaced (default {MAP_STEPS})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors():
        written = analyze_routing(args.ckpt, args.out, args.samples_per_class, cfg_scale=args.cfg_scale,
                                  sampler=args.sampler, steps=args.steps, weights=args.weights,
                                  batch_size=args.batch_size, seed=args.seed, prompts=args.prompts,
                                  prompts_file=args.prompts_file, samples_per_prompt=args.samples_per_prompt,
                                  text_encoder=args.text_encoder, text_max_length=args.text_max_length,
                                  map_steps=args.map_steps, device=args.device)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

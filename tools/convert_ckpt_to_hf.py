"""Export a training checkpoint, or import a published one, into a Hugging Face folder.

    python tools/convert_ckpt_to_hf.py --ckpt runs/demo --out hf/demo [--tag latest] \\
        [--weights ema|model] [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]
    python tools/convert_ckpt_to_hf.py --from official-ditmoe --ckpt dit_moe_s_8E2A.pt --out hf/s8
    python tools/convert_ckpt_to_hf.py --from dit --ckpt DiT-XL-2-256x256.pt --out hf/dit-xl

Training checkpoints of any layout (single process, ZeRO-1/2/3, with or without expert
parallelism, any world size) are read: EMA weights from ``ema.pt`` (default), or the trained
weights through DeepSpeed's universal checkpoint for ZeRO-3/EP. The folder loads offline with
``transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True)`` and samples with
``tools/sample.py --ckpt OUT``.
"""

import argparse
from pathlib import Path

from ditmoe.cli import Positive, make_parser, user_errors
from ditmoe.hf.export import DTYPES, export, shard_size_bytes
from ditmoe.hf.official import SOURCES, default_objective, load_published
from ditmoe.inference import load_model


def shard_size(text: str) -> str:
    """``--max-shard-size`` as given, once ``shard_size_bytes`` accepts it (else a usage error naming the flag)."""
    try:
        shard_size_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="run directory, checkpoints/ or tag directory; a .pt with --from")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tag", default="latest", help="checkpoint tag under the run (default: the latest)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (default) or trained weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB",
                   help="largest safetensors shard, e.g. 5GB or 500MB (decimal units KB, MB, GB, TB)")
    p.add_argument("--from", dest="source", choices=["ditmoe", *SOURCES], default="ditmoe",
                   help="ditmoe training checkpoint (default), or a published .pt")
    p.add_argument("--objective", choices=["ddpm", "rectified_flow"],
                   help="objective of a published model (default: rectified_flow for the official q/k-norm "
                        "XL/G layout, else ddpm)")
    p.add_argument("--num-heads", action=Positive, help="heads of a published model of non-standard width")
    p.add_argument("--top-k", action=Positive, default=2, help="experts per token of a published DiT-MoE (default 2)")
    return p


def load(args):
    """(model, objective) of the checkpoint to convert."""
    if args.source == "ditmoe":
        model, meta = load_model(args.ckpt, weights=args.weights, tag=args.tag)
        return model, meta["train_config"]["objective"]
    model = load_published(args.ckpt, args.source, num_heads=args.num_heads, top_k=args.top_k)
    return model, args.objective or default_objective(model.config)


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors(RuntimeError):
        model, objective = load(args)
        params = export(model, args.out, objective=objective, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        source=f"{args.source}:{Path(args.ckpt).name}")
    print(f"wrote {args.out} ({args.dtype}, {objective}): {params['total'] / 1e6:.3f}M parameters total, "
          f"{params['activated'] / 1e6:.3f}M activated")


if __name__ == "__main__":
    main()

"""Export a training checkpoint, or import a published one, into a Hugging Face folder.

    python tools/convert_ckpt_to_hf.py --ckpt runs/demo --out hf/demo [--tag latest] \
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.hf.export import DTYPES, export  # noqa: E402
from ditmoe.hf.official import SOURCES, load_published  # noqa: E402
from ditmoe.inference import load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory, checkpoints/ or tag directory; a .pt with --from")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tag", default="latest", help="checkpoint tag under the run (default: the latest)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--from", dest="source", choices=["ditmoe", *SOURCES], default="ditmoe",
                   help="ditmoe training checkpoint (default), or a published .pt")
    p.add_argument("--objective", choices=["ddpm", "rectified_flow"],
                   help="objective of a published model (default: rectified_flow for the official q/k-norm "
                        "XL/G layout, else ddpm)")
    p.add_argument("--num-heads", type=int, help="heads of a published model of non-standard width")
    p.add_argument("--top-k", type=int, default=2, help="experts per token of a published DiT-MoE (default 2)")
    return p.parse_args(argv)


def checkpoint_path(ckpt: str, tag: str) -> Path:
    """The directory to read: ``--tag`` picks a tag of a run or checkpoints directory."""
    path = Path(ckpt)
    if tag == "latest":
        return path
    for candidate in (path / "checkpoints" / tag, path / tag):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"checkpoint {path}: no tag {tag!r} in it or in {path / 'checkpoints'}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.source == "ditmoe":
            source = checkpoint_path(args.ckpt, args.tag)
            model, meta = load_model(source, weights=args.weights)
            objective = meta["train_config"]["objective"]
        else:
            model = load_published(args.ckpt, args.source, num_heads=args.num_heads, top_k=args.top_k)
            objective = args.objective or ("rectified_flow" if model.config.qk_norm else "ddpm")
        params = export(model, args.out, objective=objective, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        source=f"{args.source}:{Path(args.ckpt).name}")
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.out} ({args.dtype}, {objective}): {params['total'] / 1e6:.3f}M parameters total, "
          f"{params['activated'] / 1e6:.3f}M activated")


if __name__ == "__main__":
    main()

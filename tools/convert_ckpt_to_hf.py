"""Export a training checkpoint, or import a published one, into a Hugging Face folder.

    python tools/convert_ckpt_to_hf.py --ckpt runs/demo --out hf/demo [--tag latest] \\
        [--weights ema|model] [--dtype fp32|bf16|fp16] [--max-shard-size 5GB] \\
        [--text-encoder PATH_OR_ID [--text-max-length N]] [--overwrite]
    python tools/convert_ckpt_to_hf.py --from official-ditmoe --ckpt dit_moe_s_8E2A.pt --out hf/s8
    python tools/convert_ckpt_to_hf.py --from dit --ckpt DiT-XL-2-256x256.pt --out hf/dit-xl

Training checkpoints of any layout (single process, ZeRO-1/2/3, with or without expert
parallelism, any world size) are read: EMA weights from ``ema.pt`` (default), or the trained
weights through DeepSpeed's universal checkpoint for ZeRO-3/EP. The folder loads offline with
``transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True)`` and samples with
``tools/sample.py --ckpt OUT``.

Text-conditioned models (EC-DiT) name their frozen text encoder in config.json
(``text_encoder_name_or_path``, ``text_max_length``): the one the checkpoint records (its meta's
``text_encoder``, or ``text_encoder`` / ``text_max_length`` of its training config), unless
``--text-encoder`` / ``--text-max-length`` are given; none when neither says. The VAE a checkpoint records
(its meta's ``vae``: the one its training data was encoded with) is named in config.json too
(``vae_name_or_path``, ``vae_scaling_factor``), so that ``tools/sample.py`` decodes the folder's samples.
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
    p.add_argument("--out", required=True, help="output folder (written beside it, then swapped in)")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
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
    p.add_argument("--text-encoder", metavar="PATH_OR_ID",
                   help="text-conditioned models: the text encoder to name in config.json (default: the one the "
                        "checkpoint records, if any)")
    p.add_argument("--text-max-length", action=Positive,
                   help="text-conditioned models: tokens per prompt (default: the recorded one, else text_len)")
    return p


def recorded_text_encoder(meta: dict) -> tuple[str | None, int | None]:
    """(name or path, max length or None) of the text encoder a checkpoint's meta records: ``meta["text_encoder"]``
    or ``meta["train_config"]["text_encoder"]``, each a name or a ``{"name", "max_length"}`` dict (the max length
    may also be ``train_config["text_max_length"]``); (None, None) when it records none."""
    train = meta.get("train_config") or {}
    for recorded in (meta.get("text_encoder"), train.get("text_encoder")):
        if isinstance(recorded, dict) and recorded.get("name"):
            return str(recorded["name"]), recorded.get("max_length") or train.get("text_max_length")
        if isinstance(recorded, str) and recorded:
            return recorded, train.get("text_max_length")
    return None, None


def text_encoder(args, model, meta: dict) -> tuple[str | None, int | None]:
    """The text encoder to record for ``model``: the flags, else the checkpoint's; (None, None) for class models
    (where the flags are an error)."""
    if not model.config.is_text:
        if args.text_encoder or args.text_max_length:
            raise ValueError("--text-encoder/--text-max-length: the checkpoint is a class-conditional model")
        return None, None
    name, max_length = recorded_text_encoder(meta)
    if args.text_encoder:
        name, max_length = args.text_encoder, None
    if args.text_max_length:
        if not name:
            raise ValueError("--text-max-length needs a text encoder: pass --text-encoder PATH_OR_ID")
        max_length = args.text_max_length
    return name, int(max_length) if max_length else None


def load(args):
    """(model, objective, meta) of the checkpoint to convert (meta {} for published checkpoints)."""
    if args.source == "ditmoe":
        model, meta = load_model(args.ckpt, weights=args.weights, tag=args.tag)
        return model, meta["train_config"]["objective"], meta
    model = load_published(args.ckpt, args.source, num_heads=args.num_heads, top_k=args.top_k)
    return model, args.objective or default_objective(model.config), {}


def check_paths(args) -> None:
    """--tag names a checkpoint of the run (not a path elsewhere); --out does not hold the checkpoint being read
    (--overwrite would delete it)."""
    if Path(args.tag).name != args.tag or args.tag in (".", ".."):
        raise ValueError(f"--tag {args.tag!r} must name a checkpoint of the run (step_XXXXXXXX or latest), not a path")
    out, ckpt = Path(args.out).resolve(), Path(args.ckpt).resolve()
    if ckpt == out or out in ckpt.parents:
        raise ValueError(f"--out {args.out} holds the checkpoint --ckpt {args.ckpt}: export to another folder")


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors(RuntimeError):
        check_paths(args)
        model, objective, meta = load(args)
        encoder, max_length = text_encoder(args, model, meta)
        params = export(model, args.out, objective=objective, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        source=f"{args.source}:{Path(args.ckpt).name}", text_encoder=encoder,
                        text_max_length=max_length, vae=meta.get("vae"), overwrite=args.overwrite)
    print(f"wrote {args.out} ({args.dtype}, {objective}): {params['total'] / 1e6:.3f}M parameters total, "
          f"{params['activated'] / 1e6:.3f}M activated")


if __name__ == "__main__":
    main()

"""Precompute VAE latents from WebDataset image shards.

    python tools/precompute_latents.py --input 'train-{000000..000146}.tar' --out DIR \\
        --resolution 256 --vae stabilityai/sd-vae-ft-ema [--num-classes 1000] [--batch-size 64] [--workers 8]
        [--text-encoder google/t5-v1_1-xxl|minilm --text-max-length 120 [--caption-key caption]]

With --text-encoder, each sample's caption (its txt member, or a key of its json member) is embedded
by the frozen encoder and stored next to the latents; samples then need no cls.

Run one process per GPU with torchrun or srun to split the shards over ranks; rerun to resume.
See docs/data_pipeline.md for the output format.
"""

import os
from pathlib import Path

import torch

from ditmoe.cli import Positive, make_parser, user_errors
from ditmoe.data.image_shards import expand_shards
from ditmoe.data.precompute import Precompute, Settings, rank_from_env, summary_lines


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--input", nargs="+", required=True, help="input shard paths; {a..b} brace patterns expand")
    p.add_argument("--out", required=True, type=Path, aliases=["--output"],
                   help="output directory for latent shards + manifest")
    p.add_argument("--resolution", type=int, choices=(256, 512), required=True, help="image size in pixels")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: hub id or local directory")
    p.add_argument("--num-classes", action=Positive, default=None,
                   help="labels must lie in [0, N); a sample with another label is rejected, and the manifest "
                        "records N. Default: the largest label + 1, with labels of 1000 or more rejected")
    p.add_argument("--batch-size", action=Positive, default=32, help="images per VAE forward (default 32)")
    p.add_argument("--workers", action=Positive, default=min(8, os.cpu_count() or 1), help="decode threads")
    p.add_argument("--decoder", choices=("dali", "pil"), default=None,
                   help="default: dali with --device cuda, pil on cpu (faster there, see docs/data_pipeline.md)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--text-encoder", default=None,
                   help="transformers text encoder (a registered name such as minilm, hub id or local directory; "
                        "T5 loads as T5EncoderModel, CLIP as CLIPTextModel): store each sample's caption "
                        "embeddings with its latents. "
                        "Samples then need a caption and no cls (label 0 when absent)")
    p.add_argument("--text-max-length", action=Positive, default=None,
                   help="tokens per caption (padded or truncated to it); required with --text-encoder")
    p.add_argument("--caption-key", default=None,
                   help="take captions from this key of each sample's json member (default: its txt member)")
    p.add_argument("--text-batch-size", action=Positive, default=None,
                   help="captions per text encoder forward (default: --batch-size)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.text_encoder is None) != (args.text_max_length is None):
        p.error("--text-encoder and --text-max-length go together")
    if args.text_encoder is None and (args.caption_key is not None or args.text_batch_size is not None):
        p.error("--caption-key and --text-batch-size need --text-encoder")
    if args.caption_key == "":
        p.error("--caption-key must not be empty")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.decoder = args.decoder or ("dali" if args.device == "cuda" else "pil")
    return args


def main(argv=None):
    args = parse_args(argv)
    with user_errors(ImportError):  # bad input, settings or environment (no DALI): no traceback
        rank, world_size, local_rank = rank_from_env()
        settings = Settings(inputs=expand_shards(args.input), output=args.out, resolution=args.resolution,
                            vae=args.vae, batch_size=args.batch_size, workers=args.workers, decoder=args.decoder,
                            device=args.device, num_classes=args.num_classes, text_encoder=args.text_encoder,
                            text_max_length=args.text_max_length, caption_key=args.caption_key,
                            text_batch_size=args.text_batch_size)
        totals = Precompute(settings, rank, world_size, local_rank).run()
    print("\n".join(summary_lines(totals, rank, world_size, args.out)))


if __name__ == "__main__":
    main()

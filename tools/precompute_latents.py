"""Precompute VAE latents from WebDataset image shards.

    python tools/precompute_latents.py --input 'train-{000000..000146}.tar' --output DIR \
        --resolution 256 --vae stabilityai/sd-vae-ft-ema [--batch-size 64] [--workers 8]

Run one process per GPU with torchrun or srun to split the shards over ranks; rerun to resume.
See docs/data_pipeline.md for the output format.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.data.image_shards import expand_shards  # noqa: E402
from ditmoe.data.precompute import Precompute, Settings, rank_from_env  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="input shard paths; {a..b} brace patterns expand")
    p.add_argument("--output", required=True, type=Path, help="output directory for latent shards + manifest")
    p.add_argument("--resolution", type=int, choices=(256, 512), required=True)
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: hub id or local directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    p.add_argument("--decoder", choices=("dali", "pil"), default=None,
                   help="default: dali with --device cuda, pil on cpu (faster there, see docs/data_pipeline.md)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        p.error("--batch-size and --workers must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    decoder = args.decoder or ("dali" if device == "cuda" else "pil")
    try:
        rank, world_size, local_rank = rank_from_env()
        settings = Settings(inputs=expand_shards(args.input), output=args.output, resolution=args.resolution,
                            vae=args.vae, batch_size=args.batch_size, workers=args.workers, decoder=decoder,
                            device=device)
        totals = Precompute(settings, rank, world_size, local_rank).run()
    except (OSError, ValueError, ImportError) as e:  # bad input, settings or environment: no traceback
        sys.exit(f"precompute_latents: error: {e}")
    rate = totals["read"] / max(totals["seconds"], 1e-9)
    print(f"rank {rank}/{world_size}: {totals['shards']} shards ({totals['skipped']} already done), "
          f"read {totals['read']} = written {totals['written']} + rejected {totals['rejected']}, "
          f"{totals['seconds']:.1f} s, {rate:.1f} img/s, decoded by {totals['decoded_by']}")
    manifest = totals["manifest"]
    if manifest is None:
        print("other ranks still running: the last one to finish writes the manifest (rerun to retry)")
    else:
        c = manifest["counts"]
        print(f"dataset complete: {manifest['num_samples']} samples in {len(manifest['shards'])} shards; "
              f"read {c['read']} = written {c['written']} + rejected {c['rejected']}; "
              f"{args.output / 'manifest.json'}, rejects in {args.output / 'rejects.jsonl'}")
        for shard in manifest["shards"]:
            if shard["tar_error"]:
                print(f"warning: {shard['source']}: {shard['tar_error']}")


if __name__ == "__main__":
    main()

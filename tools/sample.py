"""Sample images from a trained checkpoint into an ADM-format npz.

    python tools/sample.py --ckpt runs/demo --out samples.npz --num-samples 1000 \
        [--cfg-scale 1.5] [--sampler ddpm|ddim|dpm_solver++] [--steps 50] [--grid grid.png] [--seed 0]

Writes ``arr_0`` (N, H, W, C) uint8 images and ``arr_1`` (N,) int64 class labels (classes cycle
0..K-1). Uses EMA weights unless ``--weights model``. The models of the embedded digits demo work
directly in pixel space, so their samples are the images.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.diffusion import build_objective  # noqa: E402
from ditmoe.eval.grid import save_grid  # noqa: E402
from ditmoe.inference import load_model  # noqa: E402
from ditmoe.sampling import balanced_labels, generate, to_uint8_images  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--sampler", help="ddpm (default for DDPM models) | ddim | dpm_solver++ | euler (rectified flow)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 250 ddpm, 50 ddim/euler, 20 dpm_solver++)")
    p.add_argument("--guide-channels", type=int, help="guide only the first N channels (DiT used 3 of 4)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--grid", help="also write a PNG grid (one row per class, up to 10 per row)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples <= 0:
        sys.exit(f"error: --num-samples must be positive, got {args.num_samples}")
    if not args.out.endswith(".npz"):
        sys.exit(f"error: --out {args.out} must end in .npz")
    try:
        model, meta = load_model(args.ckpt, weights=args.weights)
        objective = build_objective(meta["train_config"]["objective"])
        labels = balanced_labels(args.num_samples, model.config.num_classes)
        latents = generate(model, objective, labels, cfg_scale=args.cfg_scale, sampler=args.sampler,
                           steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                           guide_channels=args.guide_channels, progress=True)
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"error: {err}")
    images = to_uint8_images(latents).numpy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, arr_0=images, arr_1=labels.numpy().astype(np.int64))
    print(f"wrote {len(images)} samples of shape {images.shape[1:]} to {args.out}")
    if args.grid:
        k = model.config.num_classes
        per_row = min(10, args.num_samples // k)
        if per_row == 0:
            sys.exit(f"error: --grid needs at least {k} samples (one per class)")
        rows = [images[labels.numpy() == c][:per_row] for c in range(k)]
        save_grid(np.concatenate(rows), rows=k, path=args.grid)
        print(f"wrote grid {args.grid}")


if __name__ == "__main__":
    main()

"""Inception Score, FID, sFID, precision and recall of ADM-format samples against an ADM reference batch.

    python tools/evaluate.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--out metrics.json]
    python tools/evaluate.py --samples images.npz --write-ref my_ref.npz --inception-weights ...

Computes the metrics as guided-diffusion's evaluations/evaluator.py does, with a PyTorch port of its
Inception graph that loads pytorch-fid's FID Inception weights from --inception-weights (or
$DITMOE_INCEPTION_WEIGHTS). ``arr_0`` holds (N, H, W, 3) uint8 images; grayscale (N, H, W) or
(N, H, W, 1) is repeated to 3 channels. The reference's mu, sigma, mu_s, sigma_s are used when present,
otherwise computed from its arr_0; precision and recall need its arr_0. --write-ref writes such a
reference batch (those statistics and the 3-channel arr_0) for the images of --samples.

Before any work, every input npz is read through once (CRC of each member, .npy sizes) and the
reference's statistics must be finite: a damaged file is an error naming it, not a late crash or a NaN.
"""

import os

import torch

from ditmoe.cli import Positive, make_parser, user_errors
from ditmoe.eval.adm_evaluator import evaluate_samples, write_metrics, write_reference_batch

WEIGHTS_ENV = "DITMOE_INCEPTION_WEIGHTS"
METRICS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
           "recall": "Recall"}


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--samples", required=True, help="npz with arr_0 (N, H, W, 3) uint8 images")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ref", help="ADM reference batch npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    target.add_argument("--write-ref", help="write an ADM reference batch npz for the --samples images")
    p.add_argument("--inception-weights", default=os.environ.get(WEIGHTS_ENV),
                   help=f"FID Inception state dict (default: ${WEIGHTS_ENV})")
    p.add_argument("--out", help="also write the metrics as JSON (with --ref)")
    p.add_argument("--batch-size", action=Positive, default=64, help="images per Inception forward (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.inception_weights:
        p.error(f"no Inception weights: pass --inception-weights PATH or set ${WEIGHTS_ENV} "
                "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    return args


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        if args.write_ref:
            write_reference_batch(args.samples, args.write_ref, args.inception_weights, args.batch_size, args.device)
            print(f"wrote reference batch {args.write_ref}")
            return
        metrics = evaluate_samples(args.samples, args.ref, args.inception_weights, args.batch_size, args.device)
    for key, label in METRICS.items():
        print(f"{label}: {'n/a' if metrics[key] is None else metrics[key]}")
    if args.out:
        write_metrics(args.out, metrics, args.samples, args.ref)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

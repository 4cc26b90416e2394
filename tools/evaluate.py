"""Inception Score, FID, sFID, precision and recall of ADM-format samples against an ADM reference batch.

    python tools/evaluate.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--out metrics.json]
    python tools/evaluate.py --samples images.npz --write-ref my_ref.npz --inception-weights ...
    python tools/evaluate.py --samples t2i.npz [--ref ... --inception-weights ...] \\
        --clip-model openai-clip-vit-large-patch14/ [--prompts prompts.txt]

Computes the metrics as guided-diffusion's evaluations/evaluator.py does, with a PyTorch port of its
Inception graph that loads pytorch-fid's FID Inception weights from --inception-weights (or
$DITMOE_INCEPTION_WEIGHTS). ``arr_0`` holds (N, H, W, 3) uint8 images; grayscale (N, H, W) or
(N, H, W, 1) is repeated to 3 channels. The reference's mu, sigma, mu_s, sigma_s are used when present,
otherwise computed from its arr_0; precision and recall need its arr_0. --write-ref writes such a
reference batch (those statistics and the 3-channel arr_0) for the images of --samples.

Before any work, every input npz is read through once (CRC of each member, .npy sizes) and the
reference's statistics must be finite: a damaged file is an error naming it, not a late crash or a NaN.

--clip-model adds the CLIP score of text-to-image samples: 100 * mean over the (image, prompt) pairs of
max(cos(image embedding, text embedding), 0) (torchmetrics' CLIPScore), with a transformers CLIPModel read
offline from a local directory (or the local Hugging Face cache); see ditmoe/eval/clip_score.py. The prompt of
each sample comes from --prompts FILE (one per line, in the order of the samples: as many lines as samples),
or else from the samples npz itself (``prompts`` and each sample's prompt index ``arr_1``, as tools/sample.py
writes them for text models). It is printed after the ADM metrics, which are skipped without --ref
(--inception-weights is then not needed).
"""

import os

import torch

from ditmoe.cli import Positive, make_parser, user_errors
from ditmoe.eval.adm_evaluator import evaluate_samples, write_metrics, write_reference_batch
from ditmoe.eval.clip_score import clip_score_of_samples, load_clip, samples_prompts
from ditmoe.eval.inception import WEIGHTS_ENV
from ditmoe.npz import check_npz

METRICS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
           "recall": "Recall"}


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--samples", required=True, help="npz with arr_0 (N, H, W, 3) uint8 images")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ref", help="ADM reference batch npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    target.add_argument("--write-ref", help="write an ADM reference batch npz for the --samples images")
    p.add_argument("--inception-weights", default=os.environ.get(WEIGHTS_ENV),
                   help=f"FID Inception state dict (default: ${WEIGHTS_ENV})")
    p.add_argument("--clip-model", metavar="PATH_OR_ID",
                   help="also compute the CLIP score with this transformers CLIPModel (local directory, or a hub id "
                        "already in the local cache; never downloaded)")
    p.add_argument("--prompts", metavar="FILE",
                   help="with --clip-model: the prompt of each sample, one per line in sample order (default: the "
                        "prompts stored in the --samples npz)")
    p.add_argument("--out", help="also write the metrics as JSON (with --ref or --clip-model)")
    p.add_argument("--batch-size", action=Positive, default=64,
                   help="images per Inception or CLIP forward (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.prompts and not args.clip_model:
        p.error("--prompts is for the CLIP score: pass --clip-model PATH_OR_ID too")
    if not (args.ref or args.write_ref or args.clip_model):
        p.error("one of the arguments --ref --write-ref --clip-model is required")
    if args.clip_model and args.write_ref:
        p.error("--clip-model scores samples: use it with --ref or alone, not with --write-ref")
    if (args.ref or args.write_ref) and not args.inception_weights:
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
        clip = None
        if args.clip_model:  # prompts and model checked before the long ADM passes
            check_npz(args.samples)  # a damaged file is an error naming it
            prompts = samples_prompts(args.samples, args.prompts)
            clip = load_clip(args.clip_model, args.device)
        metrics = {}
        if args.ref:
            metrics = evaluate_samples(args.samples, args.ref, args.inception_weights, args.batch_size, args.device)
        if clip is not None:
            metrics["clip_score"] = clip_score_of_samples(args.samples, prompts, clip, args.batch_size)
            metrics["clip_model"] = args.clip_model
    for key, label in METRICS.items():
        if key in metrics:
            print(f"{label}: {'n/a' if metrics[key] is None else metrics[key]}")
    if "clip_score" in metrics:
        print(f"CLIP score: {metrics['clip_score']}")
    if args.out:
        write_metrics(args.out, metrics, args.samples, args.ref)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

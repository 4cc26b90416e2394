"""DDPM-250, DDIM-50 and DPM-Solver++-20 on a digits demo checkpoint, side by side.

    python benchmarks/digits_samplers.py --ckpt runs/demo [--num-samples 1000] [--cfg-scale 1.5] [--threads N]

Every sampler gets the labels and initial noise of the training run's final evaluation (classes in
equal blocks, ``generate``'s per-batch seeds), so the DDPM-250 row reproduces ``eval.json``. Prints a
markdown table: NFE counts model evaluations per sample (a CFG call, with its doubled batch, counts
two), wall time is the sampling alone, then ``cond_accuracy`` and the feature-space FID against all
1797 real digits (``ditmoe.eval.digits``), and the FID of as many real digits for reference.
"""

import argparse
import sys
import time

import numpy as np
import torch

from ditmoe.data.digits import digits_arrays, latents_to_pixels
from ditmoe.diffusion import GaussianDiffusion, build_objective
from ditmoe.eval.digits import conditional_accuracy, digits_fid, train_digits_classifier, train_digits_feature_extractor
from ditmoe.inference import load_model
from ditmoe.sampling import generate

SAMPLERS = (("ddpm", 250), ("ddim", 50), ("dpm_solver++", 20))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    parser.add_argument("--num-samples", type=int, default=1000, help="a multiple of the number of classes")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_model(args.ckpt)
    objective = build_objective(meta["train_config"]["objective"])
    if not isinstance(objective, GaussianDiffusion):
        sys.exit(f"error: {args.ckpt} was trained with objective {meta['train_config']['objective']!r}; "
                 "these samplers need 'ddpm'")
    k = model.config.num_classes
    if args.num_samples <= 0 or args.num_samples % k:
        sys.exit(f"error: --num-samples must be a positive multiple of {k}, got {args.num_samples}")
    labels = torch.arange(k).repeat_interleave(args.num_samples // k)  # (N,)
    classifier, extractor = train_digits_classifier(), train_digits_feature_extractor()

    evaluated = [0]  # samples through the model so far
    model.register_forward_hook(lambda module, inputs, output: evaluated.__setitem__(0, evaluated[0] + len(inputs[0])))
    print(f"{args.ckpt}: {args.num_samples} samples, cfg scale {args.cfg_scale}, {args.threads} threads, cpu fp32\n")
    print("| sampler | steps | NFE | wall time | vs DDPM-250 | cond_accuracy | feature FID |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    first = None
    for sampler, steps in SAMPLERS:
        evaluated[0] = 0
        start = time.perf_counter()
        latents = generate(model, objective, labels, cfg_scale=args.cfg_scale, sampler=sampler, steps=steps,
                           batch_size=args.batch_size, seed=args.seed)
        seconds = time.perf_counter() - start
        first = first or seconds
        pixels = latents_to_pixels(latents)  # (N, 8, 8) in [0, 16]
        accuracy = conditional_accuracy(pixels, labels.numpy(), classifier)
        fid = digits_fid(pixels, extractor)
        print(f"| {sampler} | {steps} | {evaluated[0] / len(labels):g} | {seconds:.1f} s | {seconds / first:.2f} "
              f"| {accuracy:.3f} | {fid:.3f} |", flush=True)
    real, _ = digits_arrays()
    subset = real[np.random.default_rng(args.seed).permutation(len(real))[: min(args.num_samples, len(real))]]
    print(f"\nreference: {len(subset)} random real digits score feature FID {digits_fid(subset, extractor):.3f}")


if __name__ == "__main__":
    main()

"""Latent loader throughput (latents/s, per worker) next to a training step's consumption rate.

    python benchmarks/latent_loader.py [--root DIR] [--batch-size 256] [--workers 0 1 2]
        [--train-samples-per-s 1000]

Without ``--root`` a synthetic dataset of ImageNet-256-like latents (4x32x32, with flips) is
written to a temporary directory. ``--train-samples-per-s`` is the rate a training step consumes
per GPU (an input here, not measured); the ratio shows the headroom of the loader.
"""

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

from ditmoe.data import LatentLoader, write_latent_dataset


def synthetic(root, num_samples, shape):
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((num_samples, *shape), dtype=np.float32)
    std = rng.uniform(0, 0.1, (num_samples, *shape)).astype(np.float32)
    write_latent_dataset(root, mean, std, rng.integers(0, 1000, num_samples), mean_flip=mean[..., ::-1],
                         std_flip=std[..., ::-1], scaling_factor=0.18215, vae="synthetic",
                         resolution=8 * shape[-1], samples_per_shard=1000, num_classes=1000)


def measure(root, batch_size, workers, batches):
    loader = LatentLoader(root, batch_size, seed=0, num_workers=workers, verify="size")
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="existing latent dataset (default: synthetic)")
    p.add_argument("--num-samples", type=int, default=8000)
    p.add_argument("--latent-shape", type=int, nargs=3, default=(4, 32, 32))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    p.add_argument("--train-samples-per-s", type=float, default=1000.0,
                   help="samples/s one training step consumes per GPU (given, not measured)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            synthetic(root, args.num_samples, tuple(args.latent_shape))
        loader = LatentLoader(root, 1, seed=0, verify="size")
        print(f"dataset {root}: {loader.num_samples} samples, latents {loader.latent_shape}, "
              f"batch {args.batch_size}; training consumes {args.train_samples_per_s:.0f} samples/s per GPU")
        for workers in args.workers:
            rate = measure(root, args.batch_size, workers, args.batches)
            per_worker = rate / max(workers, 1)
            print(f"  num_workers={workers}: {rate:8.0f} latents/s ({per_worker:7.0f} per worker), "
                  f"{rate / args.train_samples_per_s:5.1f}x the training rate")


if __name__ == "__main__":
    main()

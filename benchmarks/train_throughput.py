"""Training throughput and MFU of the real trainer (``python -m ditmoe.train``) on one GPU, with and
without activation checkpointing, measured side by side in one run.

    python benchmarks/train_throughput.py [--preset DiT-MoE-B/2-8E2A] [--zero-stage 3] \
        [--global-batch-size 256] [--steps 40] [--peak-tflops 989]

Trains on random 4×32×32 latents (the shape of 256² images under the SD VAE) in bf16. Throughput is
the trainer's own samples/s after the first logging window (warm-up); model FLOPs per sample are
3 × the forward FLOPs of ``ditmoe.model.card`` (attention included, recomputation not counted), so
MFU = samples/s × FLOPs / peak. ``--peak-tflops`` defaults to the H100 SXM dense bf16 figure.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ditmoe.data import write_latent_dataset
from ditmoe.model import get_preset
from ditmoe.model.card import model_card

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-MoE-B/2-8E2A")
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    return p.parse_args(argv)


def run(args, data: Path, out: Path, act_ckpt: int) -> dict:
    """One training run; returns its mean samples/s after the first window and its peak memory."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "ditmoe.train",
           "--preset", args.preset, "--data", str(data), "--out", str(out), "--steps", str(args.steps),
           "--global-batch-size", str(args.global_batch_size),
           "--micro-batch-size", str(args.micro_batch_size), "--zero-stage", str(args.zero_stage),
           "--precision", "bf16", "--set", f"log_every={args.log_every}", "--set", f"ckpt_every={10**9}",
           "--set", f"activation_checkpointing={act_ckpt}", "--set", "eval_samples=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.log_every]
    return {"samples_per_s": float(np.mean([r["samples_per_s"] for r in timed])),
            "peak_mem_gib": max(r.get("peak_mem_gib", float("nan")) for r in records)}


def main(argv=None):
    args = parse_args(argv)
    config = get_preset(args.preset)
    flops_per_sample = 3 * model_card(config)["gflops_full"] * 1e9
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "latents"
        rng = np.random.default_rng(0)
        n = 4096
        write_latent_dataset(data, rng.standard_normal((n, config.in_channels, config.input_size, config.input_size),
                                                       dtype=np.float32),
                             0.0, rng.integers(0, config.num_classes, n), resolution=8 * config.input_size)
        results = {ckpt: run(args, data, Path(tmp) / f"run{ckpt}", ckpt) for ckpt in (0, 1)}
    print(f"{args.preset}, ZeRO-{args.zero_stage}, bf16, global batch {args.global_batch_size} "
          f"(micro-batch {args.micro_batch_size}), 1 GPU; "
          f"{flops_per_sample / 1e9:.1f} GFLOP per training sample")
    print("| activation checkpointing | samples/s | TFLOP/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for ckpt, r in results.items():
        tflops = r["samples_per_s"] * flops_per_sample / 1e12
        print(f"| {'every block' if ckpt else 'off'} | {r['samples_per_s']:.1f} | {tflops:.1f} | "
              f"{tflops / args.peak_tflops:.1%} | {r['peak_mem_gib']:.1f} |")
    print(f"throughput with / without checkpointing: {results[1]['samples_per_s'] / results[0]['samples_per_s']:.3f}")


if __name__ == "__main__":
    main()

"""Training throughput and MFU of the real trainer (``python -m ditmoe.train`` under torchrun, one
process): presets × ZeRO stages × compile off/on, each with the repository's DeepSpeed config for its
stage (``deepspeed_configs/zero{1,3}.json``), one run after the other (all presets of one setting, then
the next setting).

    python benchmarks/train_throughput.py [--presets DiT-B/2,DiT-MoE-B/2-8E2A,DiT-MoE-XL/2-8E2A:16] \
        [--zero-stages 1,3] [--compile off,on] [--global-batch-size 64] [--micro-batch-size 64] \
        [--steps 12] [--log-every 4] [--precision bf16] [--peak-tflops 989] [--time-budget-s 0]

``NAME:M`` sets preset NAME's micro-batch size to M (XL/2-8E2A needs 16 to fit one 141 GB H200 with
ZeRO-1; it does not fit an 80 GB H100 at all). Trains on random latents of the preset's shape
(4×32×32 = 256² images under the SD VAE). Throughput is the trainer's own samples/s, averaged over
the logging windows after the first one (warm-up and compilation); model FLOPs per sample are 3 × the
forward FLOPs of ``ditmoe.model.card`` (attention included, recomputation not counted), so
MFU = samples/s × FLOPs / peak; ``--peak-tflops`` defaults to the H100 SXM / H200 dense bf16 figure.
A run that fails (e.g. out of memory) or would pass ``--time-budget-s`` is a row saying so.
CPU smoke test: ``--presets tiny --precision fp32 --zero-stages 1 --compile off --steps 4 --log-every 2``.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ditmoe.data.synthetic import write_random_latents
from ditmoe.model import get_preset
from ditmoe.model.card import model_card

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="DiT-B/2,DiT-MoE-B/2-8E2A,DiT-MoE-XL/2-8E2A:16",
                   help="comma-separated presets, NAME:M for micro-batch size M")
    p.add_argument("--zero-stages", default="1,3", help="comma-separated ZeRO stages (deepspeed_configs/zeroN.json)")
    p.add_argument("--compile", default="off,on", help="comma-separated: off, on")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=64, help="unless the preset gives one")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--activation-checkpointing", type=int, default=0, help="every n-th block (0: off)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the GPU in this precision")
    p.add_argument("--time-budget-s", type=float, default=0, help="start no run past this many seconds (0: none)")
    args = p.parse_args(argv)
    args.presets = [(name, int(micro) if micro else args.micro_batch_size)
                    for name, _, micro in (item.partition(":") for item in args.presets.split(","))]
    args.zero_stages = [int(s) for s in args.zero_stages.split(",")]
    args.compile = [{"off": False, "on": True}[c] for c in args.compile.split(",")]
    return args


def preset_latents(root: Path, preset: str, n: int = 512) -> Path:
    """``n`` random latents of the preset's shape."""
    config = get_preset(preset)
    return write_random_latents(root, (config.in_channels, config.input_size, config.input_size), config.num_classes, n)


def command(args, preset: str, micro: int, zero: int, compile_: bool, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "-m", "ditmoe.train", "--preset", preset, "--data", str(data), "--out", str(out),
            "--steps", str(args.steps), "--global-batch-size", str(args.global_batch_size),
            "--micro-batch-size", str(micro), "--deepspeed-config", str(REPO / f"deepspeed_configs/zero{zero}.json"),
            "--precision", args.precision, "--set", f"compile={str(compile_).lower()}",
            "--set", f"activation_checkpointing={args.activation_checkpointing}",
            "--set", f"log_every={args.log_every}", "--set", f"ckpt_every={10**9}",
            "--set", "eval_samples=0", "--set", "tensorboard=false"]


def run(cmd: list[str], out: Path, log_every: int, timeout: float | None) -> dict:
    """One training run: mean samples/s over the windows after the first, peak memory; or why it failed."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout stops torchrun's workers too
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"error": f"stopped at the time budget ({timeout:.0f} s)"}
    if proc.returncode != 0:
        lines = [line for line in output.splitlines() if "Error" in line or "error" in line]
        return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:160]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > log_every] or records
    return {"samples_per_s": float(np.mean([r["samples_per_s"] for r in timed])),
            "peak_mem_gib": max(r.get("peak_mem_gib", float("nan")) for r in records)}


def row(preset: str, micro: int, zero: int, compile_: bool, result: dict, args) -> str:
    gflops = 3 * model_card(get_preset(preset))["gflops_full"]
    head = f"| {preset} (micro {micro}) | {zero} | {'on' if compile_ else 'off'} |"
    if "error" in result:
        return f"{head} {result['error']} | | | |"
    tflops = result["samples_per_s"] * gflops / 1e3
    memory = "n/a" if np.isnan(result["peak_mem_gib"]) else f"{result['peak_mem_gib']:.1f}"
    return f"{head} {result['samples_per_s']:.1f} | {tflops:.3g} | {tflops / args.peak_tflops:.1%} | {memory} |"


def main(argv=None):
    args = parse_args(argv)
    start, rows = time.monotonic(), []
    print(f"{args.precision}, global batch {args.global_batch_size}, {args.steps} steps (windows of "
          f"{args.log_every}, the first not timed), activation checkpointing {args.activation_checkpointing}, "
          f"MFU against {args.peak_tflops:g} TFLOP/s; model FLOPs per sample = 3 x forward", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = {preset: preset_latents(Path(tmp) / f"data{i}", preset)
                for i, (preset, _) in enumerate(args.presets)}
        for zero in args.zero_stages:  # presets innermost: a time budget cuts settings, not whole models
            for compile_ in args.compile:
                for preset, micro in args.presets:
                    out = Path(tmp) / f"run{len(rows)}"
                    left = args.time_budget_s - (time.monotonic() - start) if args.time_budget_s else None
                    if left is not None and left < 30:
                        result = {"error": "skipped: time budget spent"}
                    else:
                        cmd = command(args, preset, micro, zero, compile_, data[preset], out)
                        result = run(cmd, out, args.log_every, left)
                    rows.append(row(preset, micro, zero, compile_, result, args))
                    print(rows[-1], flush=True)
    print("\n| model | ZeRO | compile | samples/s | TFLOP/s | MFU | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

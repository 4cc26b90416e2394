"""One steady-state step of the real trainer under ``torch.profiler``: the top kernels by device time
and the idle time between them.

    python benchmarks/profile_step.py [--preset DiT-MoE-B/2-8E2A] [--zero-stage 1] [--compile] \
        [--global-batch-size 64] [--micro-batch-size 64] [--precision bf16] [--expert-gemm auto] [--top 15] \
        [--trace step.json]

One process, one rank (``Trainer`` sets up the group), the repository's ``deepspeed_configs/zeroN.json``,
random latents of the preset's shape. Device idle time is the part of the step's device span (first
kernel start to last kernel end) that no kernel, copy or memset covers: where the GPU waits for the
host. On a GPU, one more steady-state step runs in CUDA's sync debug mode: its device synchronisations
(including those inside ATen, such as ``torch._grouped_mm``'s fallback, that no Python-level check sees)
are counted by their innermost caller outside torch. ``--expert-gemm`` sets the trainer's kernel of the experts'
grouped GEMMs (``--set expert_gemm=...``): on a GPU, ``torch`` in fp32 synchronises on every grouped GEMM and
``triton`` on none, which this count shows. On a machine without CUDA (smoke test: ``--preset
tiny --precision fp32``; ``--expert-gemm triton`` under ``TRITON_INTERPRET=1``) there are no kernels, the table
lists the ATen ops by self CPU time instead, and synchronisations are not counted.
"""

import argparse
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

from ditmoe.data.synthetic import write_random_latents
from ditmoe.model.grouped_gemm import EXPERT_GEMMS
from ditmoe.train.config import TrainConfig
from ditmoe.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TORCH_DIR = str(Path(torch.__file__).parent)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiT-MoE-B/2-8E2A")
    p.add_argument("--zero-stage", type=int, default=1, help="uses deepspeed_configs/zeroN.json")
    p.add_argument("--compile", action="store_true", help="compile each block (--set compile=true)")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--expert-gemm", choices=EXPERT_GEMMS, default="auto",
                   help="kernel of the experts' grouped GEMMs (--set expert_gemm=...)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled one")
    p.add_argument("--top", type=int, default=15, help="rows of the table")
    p.add_argument("--trace", help="also write the Chrome trace of the step here")
    return p.parse_args(argv)


def build_trainer(args, tmp: Path) -> Trainer:
    """A trainer on random latents of the preset's shape; nothing logged or saved while profiling."""
    ds_config = REPO / f"deepspeed_configs/zero{args.zero_stage}.json"
    config = TrainConfig(preset=args.preset, data=str(tmp / "data"), out=str(tmp / "out"), steps=10**9,
                         global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
                         precision=args.precision, deepspeed_config=str(ds_config), compile=args.compile,
                         expert_gemm=args.expert_gemm,
                         log_every=10**9, ckpt_every=10**9, tensorboard=False, eval_samples=0)
    model = config.model_config()
    write_random_latents(tmp / "data", (model.in_channels, model.input_size, model.input_size), model.num_classes,
                         2 * args.global_batch_size)
    return Trainer(config)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def caller_outside_torch() -> str:
    """file:line of the innermost frame outside torch, the warnings module and this file."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(TORCH_DIR) and frame.filename not in (__file__, warnings.__file__):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "?"


def device_syncs(step) -> Counter:
    """Device synchronisations during one call of ``step`` (CUDA's sync debug mode), by caller."""
    callers = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            callers[caller_outside_torch()] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return callers


def print_syncs(callers: Counter | None):
    if callers is None:
        print("\ndevice synchronisations in one steady-state step: not counted (no CUDA device)")
        return
    print(f"\ndevice synchronisations in one steady-state step: {sum(callers.values())}")
    for caller, count in callers.most_common():
        print(f"  {count} x {caller}")


def device_summary(events) -> tuple[dict, float, float, int]:
    """Per-kernel (calls, µs), busy µs (union of device intervals), idle µs within their span, number of gaps."""
    device = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    by_name = defaultdict(lambda: [0, 0.0])
    busy = idle = 0.0
    gaps, end = 0, None
    for e in device:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.elapsed_us()
        start, stop = e.time_range.start, e.time_range.end
        if end is not None and start > end:
            idle += start - end
            gaps += 1
        if end is None or stop > end:
            busy += stop - max(start, end if end is not None else start)
            end = stop
    return dict(by_name), busy, idle, gaps


def print_summary(prof, wall_ms: float, top: int):
    by_name, busy, idle, gaps = device_summary(prof.events())
    if by_name:
        rows = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
        total = sum(us for _, us in by_name.values())
        print(f"\nstep wall {wall_ms:.1f} ms; device busy {busy / 1e3:.1f} ms; idle between kernels "
              f"{idle / 1e3:.1f} ms in {gaps} gaps ({idle / (busy + idle):.1%} of the device span); "
              f"{sum(calls for calls, _ in by_name.values())} kernels")
        print("\n| kernel | calls | device ms | share of kernel time |\n| --- | --- | --- | --- |")
        for name, (calls, us) in rows:
            print(f"| {name[:90]} | {calls} | {us / 1e3:.2f} | {us / total:.1%} |")
        return
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    print(f"\nstep wall {wall_ms:.1f} ms; no device kernels (CPU run): ATen ops by self CPU time")
    print("\n| op | calls | self CPU ms |\n| --- | --- | --- |")
    for e in ops[:top]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.2f} |")


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, Path(tmp))
        x, y = next(iter(trainer.loader))  # (B, C, H, W), (B,)
        for _ in range(args.warmup):
            trainer.train_step(x, y)
        synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            trainer.train_step(x, y)
            synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3
        syncs = device_syncs(lambda: trainer.train_step(x, y)) if torch.cuda.is_available() else None
    print(f"{args.preset}, ZeRO-{args.zero_stage}, compile {'on' if args.compile else 'off'}, {args.precision}, "
          f"expert_gemm {args.expert_gemm}, "
          f"global batch {args.global_batch_size} (micro-batch {args.micro_batch_size}), "
          f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print_summary(prof, wall_ms, args.top)
    print_syncs(syncs)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()

"""Per-step overhead of the trainer: ``Trainer.train_step`` against a bare PyTorch loop on the same model
and batch, side by side in one process.

The bare loop is the least one optimizer step needs: the same ``DiT`` (same config, same initial
weights, blocks compiled the same way when ``compile`` is on), the same diffusion loss
(``build_objective(...).training_losses`` + balance loss), backward, gradient clipping and torch's
fused AdamW (the trainer's optimizer too); no DeepSpeed, no EMA, no metrics. The trainer runs its
full step (DeepSpeed engine with the repository's ``deepspeed_configs/zero{1,2,3}.json``, or none at
ZeRO-0, EMA, step metrics) in fp32 on a one-rank gloo group. Trainer and bare steps alternate, so
both see the same machine state; times are medians.
ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide unless its config sets
``memory_efficient_linear: false``; the bare loop always runs torch's own. ATen ops per step: the
``aten::`` events that ``torch.profiler`` records in one steady-state step: all (nested calls included), and
the outermost ones (called by Python, autograd or a compiled graph; what a GPU would launch, where the CPU
versions of ``_grouped_mm``, ``_fused_adamw_`` and ``_foreach_*`` loop over their tensors with ATen ops inside).

    python benchmarks/step_overhead.py [--presets tiny,S] [--zero-stages 1,2,3] [--compile off,on] [--steps 5]

Cases: ``tiny`` (the tiny preset, D = 32: per-op overhead dominates), ``tiny-deep`` (the same at depth 12,
where the blocks make most of the ops, as in the real presets) and ``S`` (DiT-MoE-S/2-8E2A, D = 384, at
16×16 latents, depth 2 and batch 4 so that it runs on a small CPU) and ``S-256`` (the same at its 32×32
latents of 256² images, batch 8: 2048 tokens per step, where the per-parameter work (EMA, optimizer) weighs
as in real training). Goals of issue 10:
trainer / bare <= 1.10 at S width and <= 1.5 at tiny width; ATen ops with compile <= half of eager.
One thread by default: what is measured is per-op overhead, and on a small shared machine several
OpenMP threads mostly measure contention with other processes (``--threads`` to change it). About 5
minutes on 2 CPU cores at the defaults.
"""

import argparse
import datetime
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ditmoe.data.synthetic import write_random_latents
from ditmoe.diffusion import build_objective
from ditmoe.model import DiT
from ditmoe.parallel.compile import apply_compile, compile_loss
from ditmoe.train.config import TrainConfig
from ditmoe.train.trainer import Trainer, micro_batch_seed


@dataclass(frozen=True)
class Case:
    preset: str
    model_overrides: tuple[str, ...]
    batch: int


REPO = Path(__file__).resolve().parents[1]
TORCH_LINEAR = torch.nn.functional.linear
CASES = {
    "tiny": Case("tiny", (), 8),
    "tiny-deep": Case("tiny", ("depth=12",), 8),  # blocks dominate the op count, as in the real presets
    "S": Case("DiT-MoE-S/2-8E2A", ("input_size=16", "depth=2"), 4),
    "S-256": Case("DiT-MoE-S/2-8E2A", ("depth=2",), 8),  # 32×32 latents (256² images): 2048 tokens per step
}


class BareLoop:
    """The same training step in plain PyTorch: model, loss, backward, clipping, AdamW."""

    def __init__(self, config: TrainConfig):
        torch.manual_seed(config.seed)
        self.config = config
        self.model = DiT(config.model_config())
        self.objective = build_objective(config.objective)
        if config.compile:
            apply_compile(self.model)
            compile_loss(self.objective)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(config.adam_beta1, config.adam_beta2), fused=True)
        self.step = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        torch.manual_seed(micro_batch_seed(self.config.seed, self.step, 0))
        losses = self.objective.training_losses(self.model, x, y)
        loss = losses["loss"].mean() + self.model.balance_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1


def train_config(case: Case, zero_stage: int, compile_: bool, data: Path, out: Path) -> TrainConfig:
    """One micro-batch per step (no accumulation), fp32, nothing logged or saved during the benchmark."""
    return TrainConfig(preset=case.preset, model_overrides=case.model_overrides, data=str(data), out=str(out),
                       steps=10**9, global_batch_size=case.batch, micro_batch_size=case.batch, precision="fp32",
                       zero_stage=zero_stage,
                       deepspeed_config=str(REPO / f"deepspeed_configs/zero{zero_stage}.json") if zero_stage else None,
                       compile=compile_, log_every=10**9, ckpt_every=10**9, tensorboard=False, eval_samples=0)


@contextmanager
def torch_linear():
    """torch's own ``F.linear`` inside the block (undoing DeepSpeed ZeRO-3's process-wide replacement)."""
    current = torch.nn.functional.linear
    torch.nn.functional.linear = TORCH_LINEAR
    try:
        yield
    finally:
        torch.nn.functional.linear = current


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def aten_ops(step) -> tuple[int, int]:
    """``aten::`` events recorded by the profiler in one call of ``step``: all of them, and the outermost ones
    (called by Python, autograd or a compiled graph, not from inside another ATen op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    outermost = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), len(outermost)


def measure(config: TrainConfig, steps: int, warmup: int) -> dict:
    """Median seconds per step and ATen ops per step of the trainer and the bare loop, alternated."""
    trainer = Trainer(config)
    x, y = next(iter(trainer.loader))  # (B, C, H, W), (B,): the same batch for every step of both
    bare = BareLoop(config)

    def bare_step():
        with torch_linear():
            bare.train_step(x, y)

    runs = {"trainer": lambda: trainer.train_step(x, y), "bare": bare_step}
    for _ in range(warmup):  # compilation, allocator and DeepSpeed buffers
        for step in runs.values():
            step()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, step in runs.items():
            times[name].append(seconds(step))
    result = {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    for name, step in runs.items():
        result[f"{name}_ops"], result[f"{name}_outer_ops"] = aten_ops(step)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,S", help=f"comma-separated cases of {sorted(CASES)}")
    p.add_argument("--zero-stages", default="0,1,2,3", help="comma-separated ZeRO stages (0: no config file)")
    p.add_argument("--compile", default="off,on", help="comma-separated: off, on")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    args.presets = args.presets.split(",")
    args.zero_stages = [int(s) for s in args.zero_stages.split(",")]
    args.compile = [{"off": False, "on": True}[c] for c in args.compile.split(",")]
    unknown = [name for name in args.presets if name not in CASES]
    if unknown:
        p.error(f"--presets: unknown {unknown}; choose from {sorted(CASES)}")
    return args


def print_settings(args):
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, device cpu ({platform.processor() or '?'}, "
          f"{os.cpu_count()} cores), {args.threads} threads, torch {torch.__version__}, fp32, one gloo rank")
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps, trainer and bare alternating; medians")
    for name in args.presets:
        case = CASES[name]
        overrides = "".join(f" {item}" for item in case.model_overrides)
        print(f"{name}: preset {case.preset}{overrides}, batch {case.batch} (one micro-batch)")


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated collectives, each step
    torch.set_num_threads(args.threads)
    print_settings(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            case = CASES[name]
            data = Path(tmp) / f"data_{name}"
            for zero_stage in args.zero_stages:
                for compile_ in args.compile:
                    label = f"{name} ZeRO-{zero_stage} compile {'on' if compile_ else 'off'}"
                    config = train_config(case, zero_stage, compile_, data, Path(tmp) / label.replace(" ", "_"))
                    if not data.exists():
                        model = config.model_config()
                        write_random_latents(data, (model.in_channels, model.input_size, model.input_size),
                                             model.num_classes, 4 * case.batch)
                    result = measure(config, args.steps, args.warmup)
                    gc.collect()  # the trainer's memory before the next one
                    torch.nn.functional.linear = TORCH_LINEAR  # the next trainer starts from torch's own
                    print(f"{label}: {result}", flush=True)
                    rows.append((label, result))
    print("\n| config | trainer ms/step | bare ms/step | ratio | ATen ops trainer (outermost) "
          "| ATen ops bare (outermost) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(f"| {label} | {r['trainer_ms']:.1f} | {r['bare_ms']:.1f} | {r['trainer_ms'] / r['bare_ms']:.2f} | "
              f"{r['trainer_ops']} ({r['trainer_outer_ops']}) | {r['bare_ops']} ({r['bare_outer_ops']}) |")


if __name__ == "__main__":
    main()

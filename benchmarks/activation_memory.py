"""Activation memory saved by per-block activation checkpointing, measured on CPU, side by side.

One training forward+backward (DDPM loss + balance loss) of a real model per mode (off, every 2nd block,
every block), each in a fresh process. Gradient buffers exist beforehand (as DeepSpeed's do), so what
a step allocates on top of the weights is activations and backward temporaries. Three measurements:

- saved: bytes autograd saves for backward (``saved_tensors_hooks``, storages counted once, parameters
  excluded): what checkpointed blocks save is invisible here, their inputs (saved by checkpointing) are not;
- held / peak: torch's CPU allocator as the profiler reports it (``profile_memory``): bytes allocated
  at the end of the forward, and the peak over forward+backward;
- RSS: peak resident set size of the process (sampled every millisecond) above the size before the
  steps, over two unprofiled steps after a warm-up (glibc told to return blocks >= 64 KiB to the system
  at once, ``MALLOC_MMAP_THRESHOLD_``, so that RSS follows what is live); the faster of them is timed.

    python benchmarks/activation_memory.py [--preset DiT-MoE-S/2-8E2A] [--depth 12] [--images 4]

(about 4 minutes on 2 CPU cores at the defaults; results in docs/planner.md)
"""

import argparse
import multiprocessing
import os
import threading
import time

import torch
from torch.autograd.graph import saved_tensors_hooks

from ditmoe.diffusion import build_objective
from ditmoe.model import DiT, get_preset
from ditmoe.parallel.activation_checkpointing import apply_activation_checkpointing
from ditmoe.parallel.memory_profile import forward_backward_memory
from ditmoe.parallel.planner import Layout, activation_bytes, backward_workspace_bytes

MODES = {"off": 0, "every 2nd block": 2, "every block": 1}
MB = 1e6


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak RSS above the start, sampled by a thread while the block runs."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = self.peak - self.start


class SavedBytes(saved_tensors_hooks):
    """Counts the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(preset: str, depth: int, images: int, every: int, seed: int) -> dict:
    config = get_preset(preset).replace(depth=depth)
    torch.manual_seed(seed)
    model = DiT(config).train()
    apply_activation_checkpointing(model, every)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    objective = build_objective("ddpm")
    x = torch.randn(images, config.in_channels, config.input_size, config.input_size)
    y = torch.randint(0, config.num_classes, (images,))

    def loss():
        return objective.training_losses(model, x, y)["loss"].mean() + model.balance_loss()

    loss().backward()  # warm-up: one-time allocations and initialisation
    seconds = []
    with RssPeak() as rss:
        for _ in range(2):
            start = time.perf_counter()
            loss().backward()
            seconds.append(time.perf_counter() - start)
    saved = SavedBytes(model)

    def forward():
        with saved:
            return loss()

    allocated = forward_backward_memory(forward)
    layout = Layout(1, 1, 0, 1, images, every, "fp32")
    return {
        "saved": saved.total,
        "held": allocated["held_after_forward"],
        "peak": allocated["peak"],
        "rss": rss.extra,
        "seconds": min(seconds),
        "planner": activation_bytes(config, images, 4, every) + backward_workspace_bytes(config, layout),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-MoE-S/2-8E2A")
    parser.add_argument("--depth", type=int, default=12, help="blocks (the preset's S depth is 12)")
    parser.add_argument("--images", type=int, default=4, help="micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = get_preset(args.preset).replace(depth=args.depth)
    print(f"{args.preset}, {args.depth} blocks, {args.images} images of {config.num_tokens} tokens, fp32, "
          f"{torch.get_num_threads()} threads; one forward+backward per mode, each in a fresh process (MB)")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read by each fresh process's glibc
    context = multiprocessing.get_context("spawn")
    results = {}
    for name, every in MODES.items():
        with context.Pool(1) as pool:
            results[name] = pool.apply(measure, (args.preset, args.depth, args.images, every, args.seed))
    off = results["off"]
    print(f"{'checkpointing':<16} {'saved':>8} {'held':>8} {'peak':>8} {'RSS':>8} {'planner':>8} "
          f"{'peak/off':>9} {'held/off':>9} {'seconds':>8} {'time/off':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['saved'] / MB:8.1f} {r['held'] / MB:8.1f} {r['peak'] / MB:8.1f} {r['rss'] / MB:8.1f} "
              f"{r['planner'] / MB:8.1f} {r['peak'] / off['peak']:9.3f} {r['held'] / off['held']:9.3f} "
              f"{r['seconds']:8.2f} {r['seconds'] / off['seconds']:9.2f}")
    print("saved: autograd's saved tensors (of a checkpointed block only its input); held / peak: allocator at the "
          "end of the forward / over forward+backward; RSS: process peak above the start; planner: "
          "ditmoe.parallel.planner's activations + backward workspace; seconds: forward+backward (a busy CPU "
          "makes them noisy)")


if __name__ == "__main__":
    main()

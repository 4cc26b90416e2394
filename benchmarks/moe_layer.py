"""MoE layer vs a dense SwiGLU MLP of equal activated FLOPs: forward+backward time, side by side.

The dense baseline has width k·F + shared width (F = 4·D), so it does the same multiply-accumulates per
token as the MoE layer's routed and shared experts; the ratio shows the cost of routing and dispatch.

    python benchmarks/moe_layer.py [--tokens 2048] [--repeats 10] [--threads N] [--device cuda] [--dtype bf16]
"""

import argparse
import statistics
import time

import torch

from ditmoe.model import get_preset
from ditmoe.model.mlp import SwiGLU
from ditmoe.model.moe import MoEFeedForward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fwd_bwd_seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    layer(x).float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per call (8 images of 256 tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"{args.tokens} tokens, {args.threads} threads, median of {args.repeats} forward+backward, "
          f"{device.type} {args.dtype}")
    print(f"{'preset':<20} {'moe ms':>8} {'dense ms':>9} {'ratio':>6}")
    for name in ("DiT-MoE-S/2-8E2A", "DiT-MoE-S/2-16E2A", "DiT-MoE-B/2-8E2A", "DiT-MoE-B/2-16E2A"):
        cfg = get_preset(name)
        moe = MoEFeedForward(cfg).train().to(device, dtype)
        dense = SwiGLU(cfg.hidden_size, cfg.top_k * cfg.expert_hidden + cfg.shared_hidden).to(device, dtype)
        x = torch.randn(args.tokens // cfg.num_tokens, cfg.num_tokens, cfg.hidden_size, device=device, dtype=dtype)
        for _ in range(2):  # warm-up
            fwd_bwd_seconds(moe, x), fwd_bwd_seconds(dense, x)
        moe_t, dense_t = [], []
        for _ in range(args.repeats):  # interleaved so both see the same machine state
            moe_t.append(fwd_bwd_seconds(moe, x))
            dense_t.append(fwd_bwd_seconds(dense, x))
        m, d = statistics.median(moe_t), statistics.median(dense_t)
        print(f"{name:<20} {m * 1e3:8.1f} {d * 1e3:9.1f} {m / d:6.2f}")


if __name__ == "__main__":
    main()

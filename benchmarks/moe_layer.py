"""MoE layer vs a dense MLP of equal activated FLOPs: forward+backward time, side by side.

The dense baseline is an MLP of the experts' activation (SwiGLU, or GELU for GELU experts) of width
(experts per token)·F + shared width (F = 4·D), so it does the same multiply-accumulates per token as the MoE
layer's routed and shared experts; the ratio shows the cost of routing and dispatch. Rows: the DiT-MoE presets
(token choice top-2), then the routing variants at S width with 8 experts: expert choice (capacity factor 2,
i.e. 2 experts per token on average) over each sample, groups of 4 samples and the whole call, and GELU experts;
``--rows tiny``: the ``tiny`` and ``tiny-ec`` presets (D = 32, 4 experts), for smoke runs.

``--expert-gemm`` (comma-separated: auto, torch, triton; default auto) times the MoE layer once per kernel of the
experts' grouped GEMMs (``ditmoe.model.grouped_gemm.set_expert_gemm``), interleaved with the dense MLP in one
run: one line per layer and kernel, ``name dtype expert_gemm moe-ms dense-ms ratio``, the dense time shared. On a
GPU, ``torch`` in fp32 (and on GPUs older than compute capability 9.0 in bf16 as well) is ``torch._grouped_mm``'s
fallback, which reads the group offsets back to the host on every call; ``triton`` never does. On the CPU,
``triton`` runs only under ``TRITON_INTERPRET=1`` (set before the run; slow, fp32 only: use ``--rows tiny``).

    python benchmarks/moe_layer.py [--tokens 2048] [--repeats 10] [--threads N] [--device cuda] [--dtype bf16]
        [--rows presets|variants|all|tiny] [--expert-gemm torch,triton]
"""

import argparse
import statistics
import time

import torch

from ditmoe.model import DiTConfig, get_preset
from ditmoe.model.card import experts_per_token
from ditmoe.model.grouped_gemm import EXPERT_GEMMS, expert_gemm, set_expert_gemm
from ditmoe.model.mlp import GeluMLP, SwiGLU
from ditmoe.model.moe import MoEFeedForward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fwd_bwd_seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
    """One forward+backward from no gradients, as a step's first micro-batch (the optimizer then clears them)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    layer(x).float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rows(which: str) -> list[tuple[str, DiTConfig]]:
    """(name, model config) of the layers to time."""
    presets = [(name, get_preset(name)) for name in
               ("DiT-MoE-S/2-8E2A", "DiT-MoE-S/2-16E2A", "DiT-MoE-B/2-8E2A", "DiT-MoE-B/2-16E2A")]
    s = get_preset("DiT-MoE-S/2-8E2A")
    ec = s.replace(routing="expert_choice", capacity_factor=2.0)
    variants = [
        ("S-8E expert choice", ec),
        ("S-8E EC group of 4", ec.replace(routing_pool="group", routing_group_size=4 * s.num_tokens)),
        ("S-8E EC batch", ec.replace(routing_pool="batch")),
        ("S-8E GELU top-2", s.replace(expert_activation="gelu")),
        ("S-8E GELU EC", ec.replace(expert_activation="gelu")),
    ]
    tiny = [(name, get_preset(name)) for name in ("tiny", "tiny-ec")]
    return {"presets": presets, "variants": variants, "all": presets + variants, "tiny": tiny}[which]


def dense_equivalent(cfg: DiTConfig, batch: int) -> torch.nn.Module:
    """A dense MLP of the experts' activation doing the routed and shared experts' work per token."""
    width = round(experts_per_token(cfg, batch) * cfg.expert_hidden) + cfg.shared_hidden
    if cfg.expert_activation == "gelu":
        return GeluMLP(cfg.hidden_size, width, bias=False)
    return SwiGLU(cfg.hidden_size, width)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per call (8 images of 256 tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rows", choices=["presets", "variants", "all", "tiny"], default="all")
    parser.add_argument("--expert-gemm", default="auto",
                        help=f"comma-separated kernels of the experts' GEMMs to time ({', '.join(EXPERT_GEMMS)})")
    args = parser.parse_args()
    gemms = list(dict.fromkeys(args.expert_gemm.split(",")))
    for mode in gemms:
        try:
            set_expert_gemm(mode)  # unknown, or triton where it cannot run: say so before timing anything
        except ValueError as error:
            parser.error(str(error))
    set_expert_gemm("auto")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"{args.tokens} tokens, {args.threads} threads, median of {args.repeats} forward+backward, "
          f"{device.type} {args.dtype}, expert_gemm {','.join(gemms)}", flush=True)
    print(f"{'layer':<20} {'dtype':<5} {'expert_gemm':<11} {'moe ms':>8} {'dense ms':>9} {'ratio':>6}", flush=True)
    for name, cfg in rows(args.rows):
        batch = max(1, args.tokens // cfg.num_tokens)
        moe = MoEFeedForward(cfg).train().to(device, dtype)
        dense = dense_equivalent(cfg, batch).to(device, dtype)
        x = torch.randn(batch, cfg.num_tokens, cfg.hidden_size, device=device, dtype=dtype)
        for mode in gemms:  # warm-up (and Triton's compilation and autotuning)
            with expert_gemm(mode):
                for _ in range(2):
                    fwd_bwd_seconds(moe, x), fwd_bwd_seconds(dense, x)
        moe_t, dense_t = {mode: [] for mode in gemms}, []
        for _ in range(args.repeats):  # interleaved so all see the same machine state
            for mode in gemms:
                with expert_gemm(mode):
                    moe_t[mode].append(fwd_bwd_seconds(moe, x))
                dense_t.append(fwd_bwd_seconds(dense, x))
        d = statistics.median(dense_t)
        for mode in gemms:
            m = statistics.median(moe_t[mode])
            print(f"{name:<20} {args.dtype:<5} {mode:<11} {m * 1e3:8.1f} {d * 1e3:9.1f} {m / d:6.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Grouped GEMM over experts: rows sorted by expert times each expert's weight, one call per pass.

``torch._grouped_mm`` computes in every dtype but has no fp32 backward and traces under torch.compile
in bf16 only, so it is wrapped here in two custom ops with their own shape functions: ``grouped_mm``,
the primitive, and ``grouped_linear`` with a backward made of ``grouped_mm`` calls: the input gradient
is another grouped GEMM, the weight gradient a grouped GEMM over the row groups that lands in the fused
``(E, N, K)`` layout of the weight (no per-expert stack). Group boundaries stay on the device: nothing
is read back to the host by ditmoe, and a compiled block sees each op as one node (no graph break). The
experts' activation ``swiglu`` is a custom op too: its backward writes both halves of the gradient in
place.

On a GPU, PyTorch has a grouped-GEMM kernel for bf16 on compute capability 9.x and 10.x only; in every
other case (fp32, A100 and older GPUs) ``torch._grouped_mm`` loops over the groups after copying the
offsets to the host, one device synchronisation per call (:func:`grouped_mm_synchronizes`). The process-wide
setting :func:`set_expert_gemm` picks the kernel behind the ops: ``torch`` (``torch._grouped_mm``),
``triton`` (DeepSpeed's Triton grouped GEMM, :mod:`.triton_grouped_gemm`: never synchronises), or ``auto``:
Triton exactly where the torch kernel would synchronise. The ops stay the graph nodes either way.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .gpu_contracts import check_expert_weight, check_grouped_gemm, checks_enabled
from .triton_grouped_gemm import grouped_mm as triton_grouped_mm
from .triton_grouped_gemm import grouped_weight_grad as triton_weight_grad
from .triton_grouped_gemm import unavailable_reason

EXPERT_GEMMS = ("auto", "torch", "triton")
_expert_gemm = "auto"


def grouped_mm_synchronizes(dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    """Whether ``torch._grouped_mm`` waits for the device: on a CUDA GPU of this compute capability its
    fallback reads the group offsets to the host (everything but bf16 on 9.x/10.x, ATen's
    ``GroupedBlas.cpp``); capability None: the CPU, where the offsets already are in host memory."""
    return capability is not None and not (dtype == torch.bfloat16 and capability[0] in (9, 10))


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def set_expert_gemm(mode: str) -> None:
    """Choose the kernel of the experts' grouped GEMMs for this process: 'auto', 'torch' or 'triton'.

    'triton' raises a ValueError where DeepSpeed's Triton kernels cannot run (no Triton; CPU tensors outside
    Triton's interpreter); 'auto' falls back to 'torch' there."""
    global _expert_gemm
    if mode not in EXPERT_GEMMS:
        raise ValueError(f"expert_gemm={mode!r} is not one of {', '.join(EXPERT_GEMMS)}")
    reason = unavailable_reason("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "triton" and reason:
        raise ValueError(f"expert_gemm='triton' cannot run here: {reason}")
    _expert_gemm = mode


@contextlib.contextmanager
def expert_gemm(mode: str):
    """:func:`set_expert_gemm` for the duration of a ``with`` block."""
    previous = _expert_gemm
    set_expert_gemm(mode)
    try:
        yield
    finally:
        set_expert_gemm(previous)


def uses_triton(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the experts' grouped GEMMs in ``dtype`` on ``device`` run DeepSpeed's Triton kernels now."""
    if _expert_gemm == "torch" or (_expert_gemm == "auto" and not grouped_mm_synchronizes(dtype, _capability(device))):
        return False  # decided without looking for Triton: the common case of every GEMM call
    reason = unavailable_reason(device.type)
    if _expert_gemm == "triton" and reason:
        raise RuntimeError(f"expert_gemm='triton' cannot run on {device.type} tensors: {reason}")
    return reason is None


def expert_gemm_waits(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the experts' grouped GEMMs in ``dtype`` on ``device`` read their offsets back to the host."""
    return not uses_triton(dtype, device) and grouped_mm_synchronizes(dtype, _capability(device))


@torch.library.custom_op("ditmoe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """a (A, K) × b (E, K, N) -> (A, N), rows of group e times b[e]; or a (N, A) × b (A, K) -> (E, N, K),
    group e's columns of a times its rows of b. offsets: (E,) int32 ends of the groups along A."""
    return _grouped_mm(a, b, offsets)


def _grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if checks_enabled():
        check_grouped_gemm(a, b, offsets)
    if not uses_triton(a.dtype, a.device):
        return torch._grouped_mm(a, b, offs=offsets)
    if b.dim() == 3:
        return triton_grouped_mm(a, b, offsets)
    return triton_weight_grad(a.t(), b, offsets)


@grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])


@torch.library.custom_op("ditmoe::grouped_linear", mutates_args=())
def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of x (A, K) times ``weight[e]ᵀ`` (weight (E, N, K)) -> (A, N).

    offsets: (E,) int32 cumulative row counts (the end of each expert's rows; the last equals A).
    """
    if checks_enabled():
        check_expert_weight(weight)
    return _grouped_mm(x, weight.transpose(-2, -1), offsets)


@grouped_linear.register_fake
def _(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _backward(ctx, grad: Tensor):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_mm(grad, weight, offsets) if ctx.needs_input_grad[0] else None  # (A, K)
    grad_w = grouped_mm(grad.t(), x, offsets) if ctx.needs_input_grad[1] else None  # (E, N, K); 0 for empty groups
    return grad_x, grad_w, None


grouped_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ditmoe::swiglu", mutates_args=())
def swiglu(h: Tensor) -> Tensor:
    """h (A, 2F) = [gate | up] -> silu(gate) · up (A, F)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


@swiglu.register_fake
def _(h: Tensor) -> Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("ditmoe::swiglu_backward", mutates_args=())
def swiglu_backward(grad: Tensor, h: Tensor) -> Tensor:
    """Gradient (A, 2F) of :func:`swiglu` at h, written in place into its two halves (autograd through
    ``chunk`` would concatenate them: one more pass over the largest activation)."""
    gate, up = h.chunk(2, dim=-1)
    out = torch.empty_like(h)
    grad_gate, grad_up = out.chunk(2, dim=-1)
    torch.mul(grad, F.silu(gate), out=grad_up)
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
    return out


@swiglu_backward.register_fake
def _(grad: Tensor, h: Tensor) -> Tensor:
    return torch.empty_like(h)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad: Tensor):
    (h,) = ctx.saved_tensors
    return swiglu_backward(grad.contiguous(), h)


swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


@register_flop_formula(torch.ops.ditmoe.grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2·(rows of every group)·K·N: each element of ``a`` meets one row of its group's (K, N) matrix, for
    (A, K)×(E, K, N) as for the weight gradient's (N, A)×(A, K) (FlopCounterMode sees the custom ops, not
    the ``torch._grouped_mm`` inside them)."""
    return 2 * math.prod(a_shape) * b_shape[-1]


@register_flop_formula(torch.ops.ditmoe.grouped_linear)
def _grouped_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[1]

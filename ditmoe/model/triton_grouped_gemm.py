"""DeepSpeed's Triton grouped GEMM, launched for ditmoe's expert ops: no host synchronisation on any GPU.

DeepSpeed ships the kernels (``deepspeed/ops/triton_ops/group_gemm_triton.py``): one for ``a (A, K) × b[e]
(K, N)`` over row groups, one for the weight gradient ``lhs_eᵀ · rhs_e`` of every group, and one that turns
the offsets into group starts and sizes on the device. Their strides are arguments, so ditmoe's fused
``(E, N, K)`` weights go in as transposed views without a copy. This module launches them itself to choose
the fp32 precision: TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set, IEEE otherwise, as
PyTorch's own matmuls do (DeepSpeed's launcher always takes TF32).

Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported) runs the same kernels on CPU
tensors: that is how they are tested without a GPU. It has no driver, so DeepSpeed's availability check
says no (its kernels are then loaded anyway) and autotuning, which times its candidates, cannot run: the
first candidate is launched. fp32 and fp16 are exact there; bf16 ``tl.dot`` is not (triton-lang/triton#11584).
"""

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device_type: str) -> str | None:
    """Why DeepSpeed's Triton kernels cannot run on tensors of ``device_type`` here, or None when they can."""
    return _unavailable_reason(device_type, interpreting())


@functools.cache
def _unavailable_reason(device_type: str, interpreter: bool) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; CUDA builds of PyTorch bring it)"
    if device_type == "cpu" and not interpreter:
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before anything imports it"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels need a CUDA GPU, not a {device_type} device"
    return None


@functools.cache
def _kernels() -> ModuleType:
    """DeepSpeed's ``group_gemm_triton`` module with its kernels defined (also in the interpreter)."""
    from deepspeed.ops.triton_ops import _triton

    module = importlib.import_module("deepspeed.ops.triton_ops.group_gemm_triton")
    if not hasattr(module, "_group_gemm_kernel") and interpreting():
        available, _triton._TRITON_AVAILABLE = _triton._TRITON_AVAILABLE, True  # read once, at import
        try:
            module = importlib.reload(module)
        finally:
            _triton._TRITON_AVAILABLE = available
    return module


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel; in the interpreter its first configuration (nothing can be timed)."""
    if interpreting():
        config = kernel.configs[0].all_kwargs()
        kernel.fn[grid](*args, **kwargs, **config)
    else:
        kernel[grid](*args, **kwargs)


def _precision(dtype: torch.dtype) -> dict:
    """fp32 ``tl.dot`` precision following PyTorch's TF32 switch (fp16/bf16: the inputs' own)."""
    if dtype != torch.float32:
        return {}
    return {"default_dot_input_precision": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"}


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """(A, K) × b (E, K, N) (any strides) -> (A, N): rows ``offsets[e-1]:offsets[e]`` of ``a`` times ``b[e]``."""
    kernels = _kernels()
    a = a.contiguous()
    rows, num_experts, width = a.shape[0], b.shape[0], b.shape[2]
    out = a.new_empty(rows, width)
    if rows == 0:
        return out
    starts, sizes = kernels._group_meta(offsets)  # (E,) int32 each, computed on the device

    def grid(meta):  # every group may end in a partial tile: at most E more tiles than rows need
        return (_cdiv(rows, meta["BLOCK_M"]) + num_experts, _cdiv(width, meta["BLOCK_N"]))

    _launch(kernels._group_gemm_kernel, grid, a, b, out, starts, sizes, rows, a.shape[1], width,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
            NUM_GROUPS=num_experts, **_precision(a.dtype))
    return out


def grouped_weight_grad(lhs: Tensor, rhs: Tensor, offsets: Tensor) -> Tensor:
    """lhs (A, N), rhs (A, K) -> (E, N, K): group e's rows of ``lhs``, transposed, times its rows of ``rhs``
    (0 for an empty group)."""
    kernels = _kernels()
    rows, width, depth, num_experts = lhs.shape[0], lhs.shape[1], rhs.shape[1], offsets.shape[0]
    if rows == 0:
        return lhs.new_zeros(num_experts, width, depth)
    out = lhs.new_empty(num_experts, width, depth)
    starts, sizes = kernels._group_meta(offsets)

    def grid(meta):
        return (num_experts, _cdiv(width, meta["BLOCK_K"]), _cdiv(depth, meta["BLOCK_N"]))

    _launch(kernels._group_gemm_dw_kernel, grid, lhs, rhs, out, starts, sizes, width, depth,
            lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1), out.stride(2),
            NUM_GROUPS=num_experts, **_precision(lhs.dtype))
    return out


def _cdiv(n: int, block: int) -> int:
    return -(-n // block)

"""What CUDA kernels and NCCL enforce, asserted on any device: insurance for code that CI only runs on the CPU.

With ``DITMOE_CHECK_GPU_CONTRACTS=1`` in the environment, ditmoe checks at each call:

- grouped GEMMs (``torch._grouped_mm``'s CUDA checks, and what DeepSpeed's Triton kernel assumes): offsets
  1-D int32, one per group; both operands of one dtype, row- or column-major, data pointers and every
  stride of a dimension longer than 1 a multiple of 16 bytes; the experts' weights contiguous;
- attention: the inputs SDPA's flash kernel takes: q, k, v 4-D ``(N, H, T, hd)`` of one dtype, that of the
  attention's weights (bf16 under bf16 training: an fp32 upcast would drop to the math kernel), the head
  dimension contiguous, a multiple of 8 and at most 256; a mask (cross-attention: the memory-efficient
  kernel) boolean;
- collectives: every tensor on the device the process group's backend needs (NCCL: the current GPU), of
  one dtype, contiguous. On the CPU this device is the CPU for every rank, so that part bites only on a GPU.

A broken contract raises :class:`GpuContractError`, naming the operand and what CUDA would refuse.
"""

import os

import torch
from torch import Tensor

ENV = "DITMOE_CHECK_GPU_CONTRACTS"


class GpuContractError(AssertionError):
    """An input CUDA kernels or NCCL would refuse (or run on a slow path)."""


def checks_enabled() -> bool:
    """Whether ``DITMOE_CHECK_GPU_CONTRACTS=1`` is set (read at every call: tests may set it late)."""
    return os.environ.get(ENV) == "1"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise GpuContractError(message)


def _aligned_operand(name: str, t: Tensor) -> None:
    """16-byte aligned data pointer and strides, row- or column-major in the last two dimensions."""
    _require(t.data_ptr() % 16 == 0, f"{name}: data pointer {t.data_ptr():#x} is not 16-byte aligned")
    long_dims = [(size, stride) for size, stride in zip(t.shape, t.stride()) if size > 1]
    _require(all(stride == 1 or stride * t.element_size() % 16 == 0 for _, stride in long_dims),
             f"{name}: strides {tuple(t.stride())} of shape {tuple(t.shape)} ({t.dtype}) are not multiples of 16 bytes")
    inner = [stride for size, stride in zip(t.shape[-2:], t.stride()[-2:]) if size > 1]
    _require(not inner or 1 in inner, f"{name}: neither row- nor column-major (strides {tuple(t.stride())})")


def check_grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor) -> None:
    """``a`` and ``b`` of one grouped GEMM (either form of ``ditmoe::grouped_mm``) and its group offsets."""
    _require(offsets.dtype == torch.int32 and offsets.dim() == 1,
             f"grouped GEMM offsets must be 1-D int32, got {offsets.dtype} of shape {tuple(offsets.shape)}")
    groups = b.shape[0] if b.dim() == 3 else None
    _require(groups is None or offsets.shape[0] == groups, f"{offsets.shape[0]} offsets for {groups} groups")
    _require(a.dtype == b.dtype, f"grouped GEMM operands of two dtypes: {a.dtype} and {b.dtype}")
    _aligned_operand("grouped GEMM operand a", a)
    _aligned_operand("grouped GEMM operand b", b)


def check_expert_weight(weight: Tensor) -> None:
    """An experts' fused weight (E, N, K) as DeepSpeed's Triton kernel takes it: contiguous."""
    _require(weight.is_contiguous(), f"experts' weight of shape {tuple(weight.shape)} is not contiguous "
                                     f"(strides {tuple(weight.stride())})")


def check_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, weight_dtype: torch.dtype) -> None:
    """SDPA inputs q, k, v (N, H, T, hd) and mask as the flash (unmasked) or memory-efficient kernel takes them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require(t.dim() == 4, f"attention {name} must be (N, H, T, hd), got shape {tuple(t.shape)}")
        _require(t.dtype == weight_dtype, f"attention {name} is {t.dtype}, the attention's weights {weight_dtype}")
        _require(t.stride(-1) == 1, f"attention {name}'s head dimension is not contiguous (strides {t.stride()})")
    head_dim = q.shape[-1]
    _require(head_dim % 8 == 0 and head_dim <= 256, f"head dimension {head_dim}: flash needs a multiple of 8, <= 256")
    _require(mask is None or mask.dtype == torch.bool, f"attention mask is {mask.dtype if mask is not None else ''}"
                                                       ", not boolean")


def check_collective(name: str, tensors: list[Tensor], device: torch.device) -> None:
    """The tensors of collective ``name`` on ``device`` (where the group's backend needs them), one dtype,
    contiguous."""
    for t in tensors:
        _require(t.device == device, f"{name}: a tensor on {t.device}, the process group needs {device}")
        _require(t.is_contiguous(), f"{name}: a non-contiguous tensor of shape {tuple(t.shape)}")
        _require(t.dtype == tensors[0].dtype, f"{name}: tensors of two dtypes, {tensors[0].dtype} and {t.dtype}")

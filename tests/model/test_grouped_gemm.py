"""When torch._grouped_mm waits for the device: PyTorch's kernel covers bf16 on compute capability 9.x/10.x
only; elsewhere on a GPU its fallback copies the group offsets to the host."""

import pytest
import torch

from ditmoe.model.grouped_gemm import grouped_mm_synchronizes


@pytest.mark.parametrize(("dtype", "capability", "waits"), [
    (torch.bfloat16, (9, 0), False),  # H100, H200: the grouped-GEMM kernel
    (torch.bfloat16, (10, 0), False),  # B200
    (torch.float32, (9, 0), True),  # fp32 has no kernel on any GPU
    (torch.bfloat16, (8, 0), True),  # A100: fallback
    (torch.bfloat16, (12, 0), True),  # consumer Blackwell: fallback
    (torch.float32, None, False),  # the CPU: offsets already in host memory
    (torch.bfloat16, None, False),
])
def test_grouped_mm_synchronizes(dtype, capability, waits):
    assert grouped_mm_synchronizes(dtype, capability) is waits

"""Check the files DeepSpeed is about to unpickle (it loads them with ``weights_only=False``, so a crafted
file would run code): each must load with ``weights_only=True``, allowing only the few types DeepSpeed
itself stores. Tensors are memory-mapped, not read, so a check costs about one read of each pickle."""

from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist

from ..weights.safe_load import safe_load


def deepspeed_types() -> list[type]:
    """The non-tensor types DeepSpeed 0.19 stores in checkpoints (imports DeepSpeed): in the optimizer
    states of ZeRO-1/2/3 and bf16 (also in a universal checkpoint's ``zero/optimizer_state.pt``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # "loss_scaler": static (1.0 in fp32 and bf16)
        DynamicLossScaler,  # "loss_scaler" under fp16 with dynamic loss scaling
        ZeroStageEnum,  # "zero_stage" of ZeRO-3 optimizer states
        fragment_address,  # "param_slice_mappings" of ZeRO-1/2 and bf16 optimizer states
    ]


def verify_files(files: Iterable[Path]):
    """Raise a ValueError naming the first of ``files`` that does not load safely."""
    allow = deepspeed_types()
    for file in files:
        safe_load(file, allow=allow, mmap=True)


def verify_dir(directory: Path):
    """Check every ``.pt`` file under ``directory``. Collective under torch.distributed: the ranks share
    the files, and every rank raises the first problem any of them found, so no rank goes on to load."""
    files = sorted(directory.rglob("*.pt"))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = None
    try:
        verify_files(files[rank::world])
    except (OSError, ValueError) as err:
        problem = str(err)
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise ValueError(problem)

"""Process-group setup that works the same alone, under torchrun, the deepspeed launcher or srun."""

import os
import socket
import sys

import torch
import torch.distributed as dist

from ..model.gpu_contracts import check_collective, checks_enabled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_launcher_env():
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM (srun) or defaults for a single process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run (set it, or launch with torchrun)")
        env["MASTER_PORT"] = str(_free_port())


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise DeepSpeed's process group (NCCL on GPU, gloo on CPU); returns (rank, world, device)."""
    import deepspeed

    export_launcher_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), device


def collective_device() -> torch.device:
    """Where collective inputs must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_collective_inputs(name: str, *tensors: torch.Tensor) -> None:
    """Under ``DITMOE_CHECK_GPU_CONTRACTS=1``: the tensors of collective ``name`` on :func:`collective_device`,
    contiguous, of one dtype (``ditmoe.model.gpu_contracts``)."""
    if checks_enabled():
        check_collective(name, list(tensors), collective_device())


def all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduction over ranks of ``values`` (a copy on its own device; the tensor itself is not changed)."""
    out = values.detach().to(collective_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(values.device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a float tensor (a copy)."""
    return all_reduce(values) / dist.get_world_size()


def on_rank0(work) -> None:
    """Collective: run ``work()`` on rank 0 only; a ValueError or OSError it raises is raised on every rank
    (same message), so all ranks stop together instead of waiting for rank 0 at the next collective."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            work()
        except (ValueError, OSError) as err:
            error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        message = [str(error) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise ValueError(message[0])
    if error is not None:
        raise error


def shutdown_distributed():
    """End a successful multi-rank run: all ranks meet, then exit at once.

    Letting the interpreter tear down DeepSpeed's and gloo's native threads aborted a rank now and
    then ("terminate called without an active exception", exit code -6) after all work was done;
    ``os._exit`` skips that teardown. Everything is flushed and closed before this point.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

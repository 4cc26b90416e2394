"""Run tiny trainings one after another in this process; record their host synchronisations, logged
losses and torch.compile statistics.

    python run_recorder.py OUT.json NAME=SETTING,SETTING... [NAME=...]

Each SETTING is a ``--set`` item of ``python -m ditmoe.train`` (``out`` defaults to OUT.json's folder/NAME).
A ``TorchFunctionMode`` sees every tensor method and torch function called during training; calls that
read a device value back to the host (or launch work whose size depends on one) are recorded with the
trainer phase they ran in (step, boundary, log, checkpoint), the step, and the first caller outside torch.
OUT.json maps NAME -> {"syncs": [...], "triton_launches": n, "losses": {step: loss}, "graphs": n, "graph_breaks": n}.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from ditmoe.model import triton_grouped_gemm
from ditmoe.train.config import resolve_config
from ditmoe.train.trainer import Trainer

T = torch.Tensor
SYNCING = {
    T.item: "item", T.tolist: "tolist", T.cpu: "cpu", T.numpy: "numpy", T.__bool__: "__bool__",
    T.__int__: "__int__", T.__float__: "__float__", T.__index__: "__index__", T.nonzero: "nonzero",
    torch.nonzero: "nonzero", torch.bincount: "bincount", T.bincount: "bincount", torch.equal: "equal",
    torch.allclose: "allclose", torch.unique: "unique", T.unique: "unique", torch.masked_select: "masked_select",
    T.masked_select: "masked_select", torch.argwhere: "argwhere", torch.where: "where",
}
TORCH_DIR = str(Path(torch.__file__).parent)


def syncing_name(func, args, kwargs) -> str | None:
    """The name of a synchronising call, or None."""
    if func is torch.where and len(args) + len(kwargs) > 1:
        return None  # where(cond, a, b) is elementwise; where(cond) alone returns data-dependent indices
    if func in SYNCING:
        return SYNCING[func]
    if func is T.__getitem__ and any(isinstance(i, T) and i.dtype == torch.bool
                                     for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
        return "boolean-mask indexing"
    if func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs:
        if len(args) > 1 and isinstance(args[1], T) or isinstance(kwargs.get("repeats"), T):
            return "repeat_interleave without output_size"
    return None


def caller() -> str:
    """file:line of the innermost frame outside torch."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "?"


class SyncCounter(TorchFunctionMode):
    def __init__(self, trainer_ref):
        super().__init__()
        self.trainer_ref = trainer_ref
        self.phase = "setup"
        self.records = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = syncing_name(func, args, kwargs)
        if name is not None:
            trainer = self.trainer_ref()
            step = trainer.step if trainer is not None else -1
            self.records.append({"phase": self.phase, "step": step, "call": name, "caller": caller()})
        return func(*args, **kwargs)


def in_phase(counter: SyncCounter, phase: str, fn):
    def run(*args, **kwargs):
        outer, counter.phase = counter.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            counter.phase = outer
    return run


def record_run(out: Path, settings: list[str]) -> dict:
    """Train ``settings`` (into ``out`` unless they name one) under a SyncCounter; returns what it saw."""
    torch._dynamo.reset()
    counters.clear()
    config = resolve_config(None, {"out": str(out)}, settings)
    holder, launches = {}, {"n": 0}
    counter = SyncCounter(lambda: holder.get("trainer"))
    launch = triton_grouped_gemm._launch

    def counted_launch(*args, **kwargs):  # expert_gemm=triton: DeepSpeed's kernels really run
        launches["n"] += 1
        return launch(*args, **kwargs)

    triton_grouped_gemm._launch = counted_launch
    with counter:
        trainer = holder["trainer"] = Trainer(config)
        trainer.train_step = in_phase(counter, "step", trainer.train_step)
        trainer.log_step = in_phase(counter, "log", trainer.log_step)
        trainer.evaluate = in_phase(counter, "eval", trainer.evaluate)
        checkpointer = trainer.checkpointer
        checkpointer.save = in_phase(counter, "checkpoint", checkpointer.save)
        checkpointer.after_step = in_phase(counter, "boundary", checkpointer.after_step)
        counter.phase = "loop"
        trainer.train()
    triton_grouped_gemm._launch = launch
    logged = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    return {"syncs": counter.records, "triton_launches": launches["n"],
            "losses": {r["step"]: r["loss"] for r in logged if "loss" in r},
            "val_loss": {r["step"]: r["val_ema/loss"] for r in logged if "val_ema/loss" in r},
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def main():
    out_json, *runs = sys.argv[1:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    results = {}
    for run in runs:
        name, settings = run.split("=", 1)
        results[name] = record_run(Path(out_json).parent / name, settings.split(","))
    Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

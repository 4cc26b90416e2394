"""DeepSpeed universal checkpoints of ditmoe runs, loadable under any world size, ZeRO stage and EP size.

``ds_to_universal`` stores every parameter's full fp32 weights and optimizer moments under
``zero/<name>/``, AutoEP layers in AutoEP's names (``router.gate.weight``, ``experts.w1/w3/w2``).
A run without EP has ditmoe's names (``gate.weight``, ``experts.gate_up_proj/down_proj``), so both
are written: the loader reads only the names the new model has. DeepSpeed converts only checkpoints
that carry ``universal_checkpoint_info``; AutoEP adds it, :func:`client_state` does for other runs.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def client_state(ep_size: int) -> dict:
    """What ``save_checkpoint`` must add so that ``ds_to_universal`` accepts a run without EP
    (with EP, AutoEP writes its own ``universal_checkpoint_info``)."""
    if ep_size > 1:
        return {}
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + "_universal")


def convert(tag_dir: Path) -> Path:
    """Convert ``tag_dir`` into ``<tag>_universal`` once (call on one rank); written under a
    temporary name and renamed, so a half conversion is never used."""
    out = universal_dir(tag_dir)
    if out.is_dir():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                           "--output_folder", str(partial)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    add_both_names(partial / "zero")
    partial.rename(out)
    (out.parent / "latest_universal").write_text(out.name)
    return out


def add_both_names(zero: Path):
    """Every MoE layer's parameters under both ditmoe's and AutoEP's names, so a checkpoint written
    with expert parallelism resumes without it and the other way round."""
    for w1 in sorted(zero.glob("*.experts.w1")):
        experts = w1.name.removesuffix(".w1")
        if not (zero / f"{experts}.gate_up_proj").exists():
            layer = experts.removesuffix(".experts")
            shutil.copytree(zero / f"{layer}.router.gate.weight", zero / f"{layer}.gate.weight")
            _convert(zero, experts, ("w1", "w3", "w2"), lambda w1, w3, w2: {
                "gate_up_proj": {"param": torch.cat([w1, w3], dim=1), "cat_dim": 0},
                "down_proj": {"param": w2, "cat_dim": 0}})
    for gate_up in sorted(zero.glob("*.experts.gate_up_proj")):
        experts = gate_up.name.removesuffix(".gate_up_proj")
        if not (zero / f"{experts}.w1").exists():
            layer = experts.removesuffix(".experts")
            shutil.copytree(zero / f"{layer}.gate.weight", zero / f"{layer}.router.gate.weight")
            _convert(zero, experts, ("gate_up_proj", "down_proj"), lambda gate_up, down: {
                "w1": _expert_state(gate_up.chunk(2, dim=1)[0]),  # gate rows first
                "w3": _expert_state(gate_up.chunk(2, dim=1)[1]),
                "w2": _expert_state(down)})


def _expert_state(param: torch.Tensor) -> dict:
    """AutoEP's universal entry of fused expert weights (E, ...)."""
    return {"param": param.contiguous(), "cat_dim": 0, "is_expert_param": True, "ep_num_experts": param.shape[0]}


def _convert(zero: Path, experts: str, sources: tuple[str, ...], build):
    """For every optimizer state, read the ``sources`` of module ``experts`` once and write the entries
    ``build(*tensors)`` returns ({short name: entry}) under ``zero/<experts>.<short name>/``."""
    folders = set()
    for state in STATES:
        tensors = [load_param(zero / f"{experts}.{source}" / f"{state}.pt") for source in sources]
        for target, entry in build(*tensors).items():
            folders.add(folder := zero / f"{experts}.{target}")
            folder.mkdir(exist_ok=True)
            torch.save(entry, folder / f"{state}.pt")
    step = zero / f"{experts}.{sources[0]}" / "step.pt"  # ZeRO-1/2 store the step per parameter, ZeRO-3 does not
    if step.is_file():
        for folder in folders:
            shutil.copy2(step, folder / "step.pt")


def load_param(file: Path) -> torch.Tensor:
    """A universal state file holds ``{"param": tensor, ...}`` (or, for ZeRO-3, possibly the bare tensor)."""
    state = torch.load(file, weights_only=False)
    return state["param"] if isinstance(state, dict) else state

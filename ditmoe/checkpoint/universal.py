"""DeepSpeed universal checkpoints of ditmoe runs, loadable under any world size, ZeRO stage and EP size.

``ds_to_universal`` stores every parameter's full fp32 weights and optimizer moments under
``zero/<name>/``, AutoEP layers in AutoEP's names (``router.gate.weight``, ``experts.w1/w3/w2``).
A run without EP has ditmoe's names (``gate.weight``, ``experts.gate_up_proj`` or ``up_proj``, ``down_proj``), so both
are written: the loader reads only the names the new model has. DeepSpeed converts only checkpoints
that carry ``universal_checkpoint_info``; AutoEP adds it, :func:`~.engine_state.client_state` does for
other runs.
"""

import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from ..model import DiT, DiTConfig
from ..weights import autoep
from ..weights.safe_load import safe_load
from .layout import universal_dir
from .meta import read_meta
from .verify import verify_files

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def convert(tag_dir: Path) -> Path:
    """Convert ``tag_dir`` into ``<tag>_universal`` once (call on one rank); written under a
    temporary name and renamed, so a half conversion is never used."""
    out = universal_dir(tag_dir)
    if out.is_dir():
        return out
    verify_files(sorted(tag_dir.glob("*.pt")))  # ds_to_universal unpickles them with weights_only=False
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                           "--output_folder", str(staging)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    add_both_names(staging / "zero", param_shapes(tag_dir))
    staging.rename(out)
    (out.parent / "latest_universal").write_text(out.name)
    return out


def param_shapes(tag_dir: Path) -> dict[str, torch.Size]:
    """Parameter shapes of the model ``tag_dir`` was trained with, in ditmoe's names (ZeRO-3's universal
    files hold flat tensors)."""
    with torch.device("meta"):
        model = DiT(DiTConfig.from_dict(read_meta(tag_dir)["model_config"]))
    return {name: p.shape for name, p in model.named_parameters()}


def add_both_names(zero: Path, shapes: dict[str, torch.Size]):
    """Every MoE layer's parameters under both ditmoe's and AutoEP's names, so a checkpoint written
    with expert parallelism resumes without it and the other way round; ``shapes``: ditmoe's shapes."""
    folders = sorted(folder.name for folder in zero.iterdir())
    for layer in autoep.autoep_layers(folders):
        if not (zero / autoep.gate_name(layer)).exists():
            shutil.copytree(zero / autoep.router_name(layer), zero / autoep.gate_name(layer))
            _convert(zero, autoep.autoep_expert_names(layer), partial(autoep.experts_to_ditmoe, layer), _entry)
    for layer in autoep.ditmoe_layers(folders):
        if not (zero / autoep.router_name(layer)).exists():
            shutil.copytree(zero / autoep.gate_name(layer), zero / autoep.router_name(layer))
            names = autoep.ditmoe_expert_names(layer, autoep.ditmoe_in_proj(layer, folders))
            _convert(zero, names, partial(autoep.experts_from_ditmoe, layer), _expert_entry, shapes)


def _entry(param: torch.Tensor) -> dict:
    """The universal entry of a parameter in ditmoe's names."""
    return {"param": param, "cat_dim": 0}


def _expert_entry(param: torch.Tensor) -> dict:
    """AutoEP's universal entry of fused expert weights (E, ...)."""
    return {"param": param.contiguous(), "cat_dim": 0, "is_expert_param": True, "ep_num_experts": param.shape[0]}


def _convert(zero: Path, sources: tuple[str, ...], rename, entry, shapes: dict | None = None):
    """For every optimizer state, read parameters ``sources`` once (shaped as ``shapes`` gives, if it names
    them) and write ``entry(tensor)`` for each {name: tensor} of ``rename(*tensors)`` to ``zero/<name>/``."""
    folders = set()
    shapes = shapes or {}
    for state in STATES:
        tensors = [load_param(zero / source / f"{state}.pt") for source in sources]
        tensors = [t.reshape(shapes.get(source, t.shape)) for t, source in zip(tensors, sources)]
        for target, param in rename(*tensors).items():
            folders.add(folder := zero / target)
            folder.mkdir(exist_ok=True)
            torch.save(entry(param), folder / f"{state}.pt")
    step = zero / sources[0] / "step.pt"  # ZeRO-1/2 store the step per parameter, ZeRO-3 does not
    if step.is_file():
        for folder in folders:
            shutil.copy2(step, folder / "step.pt")


def load_param(file: Path) -> torch.Tensor:
    """A universal state file holds ``{"param": tensor, ...}`` (or, for ZeRO-3, possibly the bare tensor)."""
    state = safe_load(file)
    return state["param"] if isinstance(state, dict) else state

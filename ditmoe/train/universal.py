"""DeepSpeed universal checkpoints of ditmoe runs, loadable under any world size, ZeRO stage and EP size.

``ds_to_universal`` stores every parameter's full fp32 weights and optimizer moments under
``zero/<name>/``, AutoEP layers in AutoEP's names (``router.gate.weight``, ``experts.w1/w3/w2``).
A run without EP has ditmoe's names (``gate.weight``, ``experts.gate_up_proj/down_proj``), so both
are written: the loader reads only the names the new model has.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

STATES = ("fp32", "exp_avg", "exp_avg_sq")


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
    add_ditmoe_names(partial / "zero")
    partial.rename(out)
    (out.parent / "latest_universal").write_text(out.name)
    return out


def add_ditmoe_names(zero: Path):
    """For every AutoEP layer in ``zero/``, its parameters also under ditmoe's names and shapes."""
    for w1 in sorted(zero.glob("*.experts.w1")):
        prefix = re.sub(r"\.experts\.w1$", "", w1.name)
        shutil.copytree(zero / f"{prefix}.router.gate.weight", zero / f"{prefix}.gate.weight")
        for name, parts in ((f"{prefix}.experts.gate_up_proj", ("w1", "w3")), (f"{prefix}.experts.down_proj", ("w2",))):
            (zero / name).mkdir()
            shutil.copy2(w1 / "step.pt", zero / name / "step.pt")
            for state in STATES:
                full = [torch.load(zero / f"{prefix}.experts.{w}" / f"{state}.pt", weights_only=False)["param"]
                        for w in parts]
                torch.save({"param": torch.cat(full, dim=1), "cat_dim": 0}, zero / name / f"{state}.pt")

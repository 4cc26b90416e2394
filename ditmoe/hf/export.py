"""Write a ditmoe model as a Hugging Face folder: config.json, (sharded) safetensors, the remote
modeling code, the diffusion schedule and a model card."""

import json
import re
from pathlib import Path

import torch

from ..model import DiT
from ..model.card import count_parameters
from ..weights import hf
from .configuration_ditmoe import DiTMoEConfig
from .load import SCHEDULER_FILE
from .modeling_ditmoe import DiTMoEModel
from .remote_code import write_remote_code

AUTO_MAP = {"AutoConfig": "configuration_ditmoe.DiTMoEConfig", "AutoModel": "modeling_ditmoe.DiTMoEModel"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as Hugging Face counts


def shard_size_bytes(size: str) -> int:
    """``size`` such as ``5GB``, ``500MB`` or ``0.5GB`` in bytes; ValueError unless it is at least one byte."""
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]B)\s*", size, re.IGNORECASE)
    count = int(float(match[1]) * SIZE_UNITS[match[2].upper()]) if match else 0
    if count < 1:
        raise ValueError(f"{size!r} is not a positive size such as 5GB or 500MB (units KB, MB, GB, TB)")
    return count


def diffusion_config(objective: str, learn_sigma: bool) -> dict:
    """The training objective's schedule, in diffusers' scheduler key names where they exist."""
    if objective == "ddpm":
        return {"objective": "ddpm", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                "beta_end": 0.02, "prediction_type": "epsilon",
                "variance_type": "learned_range" if learn_sigma else "fixed_small"}
    if objective == "rectified_flow":
        return {"objective": "rectified_flow", "prediction_type": "velocity", "path": "x_t = (1 - t) x_0 + t noise",
                "time_scale": 1.0, "sampler": "euler"}
    raise ValueError(f"unknown objective {objective!r}; choose ddpm or rectified_flow")


def export(model: DiT, out: str | Path, *, objective: str, dtype: str = "fp32", max_shard_size: str = "5GB",
           source: str = "") -> dict:
    """Save ``model`` into ``out``; returns the parameter counts. ``source`` is named in the card."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    shard_bytes = shard_size_bytes(max_shard_size)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = DiTMoEConfig.from_dit_config(model.config, auto_map=AUTO_MAP)
    hf_model = DiTMoEModel(config)
    hf_model.load_state_dict(hf.from_ditmoe(model.state_dict()))
    hf_model.to(DTYPES[dtype])
    hf_model.save_pretrained(out, max_shard_size=shard_bytes)
    write_remote_code(out)
    schedule = diffusion_config(objective, model.config.learn_sigma)
    (out / SCHEDULER_FILE).write_text(json.dumps(schedule, indent=2) + "\n")
    params = count_parameters(model.config)
    (out / "README.md").write_text(model_card(config, schedule, params, dtype, source))
    return params


def model_card(config: DiTMoEConfig, schedule: dict, params: dict, dtype: str, source: str) -> str:
    """README.md with YAML front matter, the architecture, parameter counts and how to sample."""
    dit = config.to_dit_config()
    kind = f"{dit.num_experts} experts, {dit.routing.replace('_', ' ')}" if dit.is_moe else "dense"
    moe_rows = ""
    if dit.is_moe:
        routing = (f"top-{dit.top_k}" if dit.routing == "token_choice"
                   else f"capacity factor {dit.capacity_factor}")
        moe_rows = (f"| routed experts | {dit.num_experts} ({routing}), SwiGLU width {config.expert_hidden_size} |\n"
                    f"| shared experts | {dit.num_shared_experts}, "
                    f"total SwiGLU width {config.shared_expert_hidden_size} |\n"
                    f"| MoE placement | {dit.moe_placement}; balance-loss α {dit.balance_loss_alpha} |\n")
    sampler = "--sampler ddpm --steps 250" if schedule["objective"] == "ddpm" else "--sampler euler --steps 50"
    latents = f"{dit.in_channels}×{dit.input_size}×{dit.input_size}"
    return f"""---
library_name: transformers
pipeline_tag: unconditional-image-generation
tags:
- ditmoe
- diffusion
- mixture-of-experts
- class-conditional
---

# DiT-MoE model ({kind})

Exported by ditmoe{f' from `{source}`' if source else ''}. Weights in {dtype}.

| | |
|---|---|
| parameters | {params['total'] / 1e6:.2f} M total, {params['activated'] / 1e6:.2f} M activated per token |
| input | latents {latents}, patch {dit.patch_size}, {dit.num_classes} classes |
| transformer | depth {dit.depth}, width {dit.hidden_size}, {dit.num_heads} heads, q/k norm {dit.qk_norm} |
{moe_rows}| objective | {schedule['objective']} (see `{SCHEDULER_FILE}`), learned σ {dit.learn_sigma} |

## Load

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("THIS_FOLDER", trust_remote_code=True).eval()
x = torch.randn(1, {dit.in_channels}, {dit.input_size}, {dit.input_size})
out = model(x, torch.tensor([500]), torch.tensor([0]))  # (1, {dit.out_channels}, {dit.input_size}, {dit.input_size})
```

## Sample

With ditmoe installed: `python tools/sample.py --ckpt THIS_FOLDER --out samples.npz --num-samples 100
--cfg-scale 1.5 {sampler}` (ADM npz of images/latents; the label index {dit.num_classes} is the
unconditional class used by classifier-free guidance).
"""

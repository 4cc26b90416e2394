"""Write a ditmoe model as a Hugging Face folder: config.json, (sharded) safetensors, the remote
modeling code, the diffusion schedule and a model card.

The folder is written beside ``out`` and swapped in when complete: an export never mixes with an earlier
one (a stale ``model.safetensors`` beside a new index would win in ``from_pretrained``), a failed one leaves
nothing behind (a full disk is one error naming ``out``, whatever library was writing), and a non-empty ``out``
is replaced only when asked to."""

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..model import DiT
from ..model.card import count_parameters
from ..weights import hf
from ..write_errors import writing
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


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool = False):
    """Yield an empty folder beside ``out`` that replaces ``out`` when the block succeeds (removed if it fails).

    A non-empty ``out`` is refused (FileExistsError) unless ``overwrite``; it is then deleted only once the new
    folder is complete. Between the two renames of the swap ``out`` is briefly absent."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty: pass --overwrite to replace what it holds")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = out.with_name(f".{out.name}.replaced-{os.getpid()}") if out.exists() else None
    if previous is not None:
        os.rename(out, previous)
    os.rename(staging, out)
    if previous is not None:
        shutil.rmtree(previous)


def export(model: DiT, out: str | Path, *, objective: str, dtype: str = "fp32", max_shard_size: str = "5GB",
           source: str = "", text_encoder: str | None = None, text_max_length: int | None = None,
           vae: dict | None = None, overwrite: bool = False) -> dict:
    """Save ``model`` into the folder ``out`` (a non-empty one only with ``overwrite``: replaced as a whole);
    returns the parameter counts. ``source`` is named in the card.

    Text-conditioned models: ``text_encoder`` (hub id or path of the frozen encoder the captions come from)
    and ``text_max_length`` (its tokens per prompt, default the model's ``text_len``) are recorded in
    config.json as ``text_encoder_name_or_path`` and ``text_max_length``; both optional. ``vae`` (a checkpoint's
    ``{"name", "scaling_factor"}``: the VAE its data was encoded with, which decodes the samples) is recorded as
    ``vae_name_or_path`` and ``vae_scaling_factor``; optional. Everything is checked before anything is written."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    shard_bytes = shard_size_bytes(max_shard_size)  # before anything is written
    config = DiTMoEConfig.from_dit_config(model.config, auto_map=AUTO_MAP, text_encoder_name_or_path=text_encoder,
                                          text_max_length=text_max_length,
                                          vae_name_or_path=(vae or {}).get("name"),
                                          vae_scaling_factor=(vae or {}).get("scaling_factor"))
    schedule = diffusion_config(objective, model.config.learn_sigma)
    hf_model = DiTMoEModel(config)
    hf_model.load_state_dict(hf.from_ditmoe(model.state_dict()))
    hf_model.to(DTYPES[dtype])
    params = count_parameters(model.config)
    with writing(out), staged_folder(Path(out), overwrite) as folder:
        hf_model.save_pretrained(folder, max_shard_size=shard_bytes)
        write_remote_code(folder)
        (folder / SCHEDULER_FILE).write_text(json.dumps(schedule, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(config, schedule, params, dtype, source))
    return params


def _ffn_name(dit) -> str:
    """The experts' feed-forward: SwiGLU (DiT-MoE) or GELU (EC-DiT)."""
    return "SwiGLU" if dit.expert_activation == "swiglu" else "GELU"


def _moe_rows(config: DiTMoEConfig) -> str:
    dit = config.to_dit_config()
    if not dit.is_moe:
        return ""
    ffn = _ffn_name(dit)
    routing = f"top-{dit.top_k}" if dit.routing == "token_choice" else f"capacity factor {dit.capacity_factor}"
    shared = (f"{dit.num_shared_experts}, total {ffn} width {config.shared_expert_hidden_size}"
              if dit.num_shared_experts and config.shared_expert_hidden_size else "none")
    placement = dit.moe_placement
    if dit.moe_placement != "all":
        placement += f" (the other blocks: dense GELU MLP of width {int(dit.mlp_ratio * dit.hidden_size)})"
    balance = f"; balance-loss α {dit.balance_loss_alpha}" if dit.routing == "token_choice" else ""
    return (f"| routed experts | {dit.num_experts} ({routing}), {ffn} width {config.expert_hidden_size} |\n"
            f"| shared experts | {shared} |\n"
            f"| MoE placement | {placement}{balance} |\n")


def _attention(dit) -> str:
    heads = f"{dit.num_heads} heads"
    if dit.kv_heads != dit.num_heads:
        heads += f" ({dit.kv_heads} key/value heads: grouped-query attention)"
    return heads


def _vae_row(config: DiTMoEConfig) -> str:
    if not config.vae_name_or_path:
        return ""
    if config.vae_name_or_path == "identity":
        return "| VAE | none: the model works on the pixels |\n"
    return (f"| VAE | `{config.vae_name_or_path}` (not in these weights): decode `latents / "
            f"{config.vae_scaling_factor}` |\n")


def _text_rows(config: DiTMoEConfig) -> str:
    dit = config.to_dit_config()
    if not dit.is_text:
        return ""
    encoder = (f"`{config.text_encoder_name_or_path}` (frozen, not in these weights), prompts padded or truncated "
               f"to {config.text_max_length} tokens" if config.text_encoder_name_or_path
               else "not recorded (any encoder of token width " f"{dit.text_dim} the model was trained with)")
    null = (f"learned null caption ({dit.text_len} tokens) for classifier-free guidance"
            if dit.class_dropout_prob > 0 else "no null caption (trained without caption dropout)")
    pooled = "; masked mean of the projected caption (MLP) added to the adaLN input" if dit.pooled_text else ""
    return (f"| text encoder | {encoder} |\n"
            f"| text conditioning | cross-attention to the caption tokens in every block (after self-attention, "
            f"before the feed-forward); caption projection Linear({dit.text_dim}, {dit.hidden_size}) → GELU → "
            f"Linear{pooled}; {null} |\n")


def model_card(config: DiTMoEConfig, schedule: dict, params: dict, dtype: str, source: str) -> str:
    """README.md with YAML front matter, the architecture, parameter counts and how to load and sample."""
    dit = config.to_dit_config()
    kind = f"{dit.num_experts} {_ffn_name(dit)} experts, {dit.routing.replace('_', ' ')}" if dit.is_moe else "dense"
    latents = f"{dit.in_channels}×{dit.input_size}×{dit.input_size}"
    if dit.is_text:
        title = f"Text-conditioned DiT{'-MoE (EC-DiT)' if dit.is_moe else ''} model ({kind})"
        tags = "- text-to-image\n- text-conditioned\n"
        inputs = (f"latents {latents}, patch {dit.patch_size}; caption: {dit.text_len} token embeddings of width "
                  f"{dit.text_dim} and their mask")
        excluded = " (the text encoder not included)"
    else:
        title = f"DiT-MoE model ({kind})"
        tags = "- class-conditional\n"
        inputs = f"latents {latents}, patch {dit.patch_size}, {dit.num_classes} classes"
        excluded = ""
    objective = f"| objective | {schedule['objective']} (see `{SCHEDULER_FILE}`), learned σ {dit.learn_sigma} |"
    return f"""---
library_name: transformers
pipeline_tag: {'text-to-image' if dit.is_text else 'unconditional-image-generation'}
tags:
- ditmoe
- diffusion
{'- mixture-of-experts' + chr(10) if dit.is_moe else ''}{tags}---

# {title}

Exported by ditmoe{f' from `{source}`' if source else ''}. Weights in {dtype}.

| | |
|---|---|
| parameters | {params['total'] / 1e6:.2f} M total, {params['activated'] / 1e6:.2f} M activated per token{excluded} |
| input | {inputs} |
| transformer | depth {dit.depth}, width {dit.hidden_size}, {_attention(dit)}, q/k norm {dit.qk_norm} |
{_vae_row(config)}{_text_rows(config)}{_moe_rows(config)}{objective}

{_load_section(config, schedule)}
"""


def _vae_flags(config: DiTMoEConfig) -> str:
    """What sampling needs to be told of the VAE: nothing when recorded or for images, else ``--vae``."""
    dit = config.to_dit_config()
    return "" if config.vae_name_or_path or dit.in_channels in (1, 3) else " --vae VAE --scaling-factor F"


def _load_section(config: DiTMoEConfig, schedule: dict) -> str:
    dit = config.to_dit_config()
    sampler = "--sampler ddpm --steps 250" if schedule["objective"] == "ddpm" else "--sampler euler --steps 50"
    t = "torch.tensor([500])" if schedule["objective"] == "ddpm" else "torch.tensor([0.5])"
    shape = f"(1, {dit.out_channels}, {dit.input_size}, {dit.input_size})"
    x = f"x = torch.randn(1, {dit.in_channels}, {dit.input_size}, {dit.input_size})"
    if not dit.is_text:
        return f"""## Load

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("THIS_FOLDER", trust_remote_code=True).eval()
{x}
out = model(x, {t}, torch.tensor([0]))  # {shape}
```

## Sample

With ditmoe installed: `python tools/sample.py --ckpt THIS_FOLDER --out samples.npz --num-samples 100
--cfg-scale 1.5 {sampler}{_vae_flags(config)}` (ADM npz of images; the label index {dit.num_classes} is the
unconditional class used by classifier-free guidance)."""
    name, length = config.text_encoder_name_or_path, config.text_max_length
    encoder = f'"{name}"' if name else '"TEXT_ENCODER"'
    length = length or dit.text_len
    flags = "" if name else f" --text-encoder TEXT_ENCODER --text-max-length {dit.text_len}"
    guidance, cfg = (("classifier-free guidance is against the model's learned null caption", "4.5")
                     if dit.class_dropout_prob > 0 else ("the model has no null caption: no classifier-free guidance",
                                                         "1.0"))
    return f"""## Load

The model is conditioned on a caption: the token embeddings (N, L, {dit.text_dim}) of the frozen text encoder
{f'`{name}`' if name else '(not recorded in config.json)'} (its last hidden states for the prompt tokenized to
{length} tokens, padded on the right, padding embeddings zero) and their mask (N, L), True on real tokens.
Pass them as `y=(tokens, mask)` or as `encoder_hidden_states` / `encoder_attention_mask`.

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("THIS_FOLDER", trust_remote_code=True).eval()
{x}
tokens = torch.randn(1, {dit.text_len}, {dit.text_dim})  # the text encoder's token embeddings
mask = torch.ones(1, {dit.text_len}, dtype=torch.bool)  # True on real tokens
out = model(x, {t}, (tokens, mask))  # {shape}
```

With ditmoe installed, `ditmoe.text.TextEncoder.load({encoder}, {length}).encode(["a prompt"])` gives the
caption of a prompt.

## Sample

With ditmoe installed: `python tools/sample.py --ckpt THIS_FOLDER --out samples.npz --num-samples 16
--prompt "a prompt" --cfg-scale {cfg} {sampler}{flags}{_vae_flags(config)}` (ADM npz of images with the prompts;
{guidance})."""

"""Record and save the expert routing of a checkpoint while it samples (paper §3.3, Figures 5-7; EC-DiT's
adaptive compute for text-conditioned models)."""

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..diffusion import objective_for
from ..inference import load_model
from ..sampling import balanced_labels, generate, to_uint8_images
from .adaptive_compute import record_adaptive_compute
from .adaptive_compute_plots import MAP_STEPS, save_adaptive_compute_maps
from .routing_plots import save_routing_plots
from .routing_stats import RoutingRecorder


def record_routing(model, objective, labels, *, cfg_scale: float, sampler: str, steps: int | None,
                   batch_size: int, seed: int):
    """RoutingStats of sampling ``labels`` in batches; batch b starts from noise seeded by ``seed + b``."""
    with RoutingRecorder(model) as recorder:
        for b, y in enumerate(labels.split(batch_size)):
            recorder.start_run()
            generate(model, objective, y, cfg_scale=cfg_scale, sampler=sampler, steps=steps, batch_size=len(y),
                     seed=seed + b, progress=True)
    return recorder.stats()


def analyze_routing(ckpt: str, out: str | Path, samples_per_class: int | None = None, *, cfg_scale: float = 1.0,
                    sampler: str | None = None, steps: int | None = None, weights: str = "ema",
                    batch_size: int = 250, seed: int = 0, prompts: tuple[str, ...] | list[str] = (),
                    prompts_file: str | None = None, samples_per_prompt: int = 1, text_encoder: str | None = None,
                    text_max_length: int | None = None, map_steps: int = MAP_STEPS,
                    device: str | torch.device = "cpu") -> list[Path]:
    """Sample from ``ckpt`` while recording each token's experts and write the analysis into ``out``; returns the
    paths written. Nothing is written when the checkpoint or the settings are bad.

    Class-conditional models: ``samples_per_class`` images of every class; ``routing_stats.npz``,
    ``routing_stats.json`` and the PNG heatmaps of :func:`save_routing_plots`. Text-conditioned models:
    ``samples_per_prompt`` images of every prompt (``prompts``, then the lines of ``prompts_file``), captions
    from ``text_encoder`` / ``text_max_length`` (default: what the checkpoint records); see
    :func:`analyze_adaptive_compute`."""
    model, meta = load_model(ckpt, weights=weights, device=device)
    if not model.config.is_moe:
        raise ValueError(f"checkpoint {ckpt} is a dense model (num_experts=0): no MoE layers to analyse")
    settings = {"ckpt": str(ckpt), "cfg_scale": cfg_scale, "weights": weights, "seed": seed}
    if model.config.is_text:
        if samples_per_class is not None:
            raise ValueError(f"{ckpt} is a text-conditioned model: it takes prompts (--prompt, --prompts) and "
                             "--samples-per-prompt, not --samples-per-class")
        from ..eval.prompts import read_prompts

        prompts = read_prompts(tuple(prompts), prompts_file)
        return analyze_adaptive_compute(model, meta, out, prompts, samples_per_prompt=samples_per_prompt,
                                        text_encoder=text_encoder, text_max_length=text_max_length,
                                        cfg_scale=cfg_scale, sampler=sampler, steps=steps, batch_size=batch_size,
                                        seed=seed, map_steps=map_steps, settings=settings)
    if prompts or prompts_file or text_encoder or text_max_length:
        raise ValueError(f"{ckpt} is a class-conditional model: it takes no prompts nor text encoder")
    if samples_per_class is None:
        raise ValueError(f"{ckpt} is a class-conditional model: pass --samples-per-class N")
    train_config = meta["train_config"]
    objective = objective_for(train_config["objective"], model.config)
    sampler = sampler or objective.default_sampler
    labels = balanced_labels(samples_per_class * model.config.num_classes, model.config.num_classes)
    stats = record_routing(model, objective, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps,
                           batch_size=batch_size, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats.save_npz(out / "routing_stats.npz")
    preset = train_config.get("preset", "model")
    settings = {"ckpt": str(ckpt), "preset": preset, "objective": train_config["objective"],
                "sampler": sampler, "steps": len(stats.step_timesteps), "cfg_scale": cfg_scale,
                "weights": weights, "seed": seed, "samples_per_class": samples_per_class}
    (out / "routing_stats.json").write_text(json.dumps({"settings": settings, **stats.summary()}, indent=1) + "\n")
    title = (f"{preset} ({len(labels)} samples, {sampler} {len(stats.step_timesteps)} steps, "
             f"cfg {cfg_scale:g})")
    return [out / "routing_stats.npz", out / "routing_stats.json", *save_routing_plots(stats, out, title)]


def compact_json(data) -> str:
    """``json.dumps(data, indent=1)`` with every list of numbers on one line (tables stay readable)."""
    text = json.dumps(data, indent=1)
    number = r"-?[\d.eE+-]+"
    # only lists json.dumps spread over lines: a string's newlines are escaped, so text inside strings stays
    return re.sub(rf"\[\n\s*({number}(?:,\n\s*{number})*)\n\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def resolve_text_encoder(meta: dict, name: str | None, max_length: int | None, text_len: int) -> tuple[str, int]:
    """(encoder, max_length) of a text model's prompts: the arguments when given, else what the checkpoint
    records (meta ``text_encoder`` {"name", "max_length"}, or train_config ``text_encoder`` /
    ``text_max_length``); the length falls back to the model's ``text_len``. ValueError when no encoder is known."""
    recorded = meta.get("text_encoder") if isinstance(meta.get("text_encoder"), dict) else {}
    train = meta.get("train_config") or {}
    train_encoder = train.get("text_encoder")
    if isinstance(train_encoder, dict):
        train_encoder, train_length = train_encoder.get("name"), train_encoder.get("max_length")
    else:
        train_length = train.get("text_max_length")
    name = name or recorded.get("name") or train_encoder
    if not name:
        raise ValueError("the checkpoint records no text encoder (neither meta text_encoder nor train_config "
                         "text_encoder): pass --text-encoder PATH_OR_ID (and --text-max-length N, default the "
                         f"model's text_len={text_len})")
    max_length = max_length or recorded.get("max_length") or train_length or text_len
    return str(name), int(max_length)


def analyze_adaptive_compute(model, meta: dict, out: str | Path, prompts: list[str], *, samples_per_prompt: int = 1,
                             text_encoder: str | None = None, text_max_length: int | None = None,
                             cfg_scale: float = 1.0, sampler: str | None = None, steps: int | None = None,
                             batch_size: int = 250, seed: int = 0, map_steps: int = MAP_STEPS,
                             settings: dict | None = None) -> list[Path]:
    """EC-DiT's adaptive compute of a text-conditioned MoE ``model``: sample ``samples_per_prompt`` images of
    every prompt (samples cycle through the prompts, as in tools/sample.py) while recording how many experts
    took each image token, then write into ``out``:

    * ``adaptive_compute.npz``: ``experts_per_token`` (steps, layers, N, H_tokens, W_tokens) int16 (and
      ``experts_per_token_null``, the guidance's unconditional half, N = 0 without guidance), ``unprocessed_fraction``
      (steps, layers), ``step_timesteps``, ``layer_blocks``, ``samples`` (N, H, W, C) uint8, ``prompts`` and
      ``prompt_index`` (N,);
    * ``adaptive_compute.json``: settings and :meth:`AdaptiveCompute.summary` with a group per prompt;
    * ``adaptive_compute_prompt{p}.png``: the count maps over prompt p's first sample, ``map_steps`` steps.

    Prints the unprocessed-fraction table. Returns the paths written."""
    from ..eval.prompts import prompt_captions
    from ..text import TextEncoder

    cfg = model.config
    name, max_length = resolve_text_encoder(meta, text_encoder, text_max_length, cfg.text_len)
    encoder = TextEncoder.load(name, max_length, device=next(model.parameters()).device)  # the model's device
    if encoder.width != cfg.text_dim:
        raise ValueError(f"text encoder {name!r} gives {encoder.width}-wide token embeddings, the model expects "
                         f"text_dim={cfg.text_dim}")
    captions, prompt_index = prompt_captions(prompts, len(prompts) * samples_per_prompt, encoder)
    train_config = meta.get("train_config") or {}
    objective = objective_for(train_config["objective"], model.config)
    sampler = sampler or objective.default_sampler
    ac, latents = record_adaptive_compute(model, objective, captions, cfg_scale=cfg_scale, sampler=sampler,
                                          steps=steps, batch_size=batch_size, seed=seed, progress=True)
    images = to_uint8_images(latents).numpy()  # (N, H, W, C)
    index = prompt_index.numpy()
    groups = [(prompt, np.flatnonzero(index == p)) for p, prompt in enumerate(prompts)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ac.save_npz(out / "adaptive_compute.npz", samples=images, prompts=np.array(prompts), prompt_index=index)
    preset = train_config.get("preset", "model")
    settings = {**(settings or {}), "preset": preset, "objective": train_config["objective"], "sampler": sampler,
                "steps": ac.num_steps, "cfg_scale": cfg_scale, "seed": seed, "batch_size": batch_size,
                "samples_per_prompt": samples_per_prompt, "prompts": list(prompts),
                "text_encoder": {"name": name, "max_length": max_length}}
    summary = {"settings": settings, **ac.summary(groups)}
    (out / "adaptive_compute.json").write_text(compact_json(summary) + "\n")
    title = f"{preset}, {sampler} {ac.num_steps} steps, cfg {cfg_scale:g}"
    pngs = save_adaptive_compute_maps(ac, images, groups, out, title, num_steps=map_steps)
    print(ac.format_table())
    return [out / "adaptive_compute.npz", out / "adaptive_compute.json", *pngs]

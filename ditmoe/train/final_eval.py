"""End-of-training evaluation of the digits demos: sample grid (one row per class), cond_accuracy, pixel FD with
the real digits' floor beside it, and diversity (``digits_quality``).

The text-to-image demo is prompted with captions: a third of the samples with the training phrasings of each
digit, a third with held-out templates and a third with the form of each digit never seen in training
(``digit_captions``); the accuracy with which the independent classifier recognises the digit each prompt
names, the pixel FD and the diversity are reported per group.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.digits import latents_to_pixels, pixels_to_uint8
from ..diffusion import objective_for
from ..eval.digits import digits_quality
from ..eval.grid import save_grid
from ..eval.prompts import load_text_encoder
from ..inference import load_model
from ..model.conditioning import Caption, batch_size
from ..sampling import generate, num_batches
from ..write_errors import staged_file
from .config import TrainConfig

BATCH_SIZE = 100  #: Samples per sampling batch: one progress bar update each.


def final_eval(config: TrainConfig) -> dict:
    """Rank 0 samples ``eval_samples`` digits (equal per class) with EMA weights; other ranks return {}."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    out = Path(config.out)
    model, meta = load_model(out, weights="ema")
    if model.config.is_text:
        return final_eval_text(config, model, meta)
    num_classes = model.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(config.eval_samples // num_classes)
    pixels = sample_pixels(config, model, labels)  # (N, 8, 8) in [0, 16]
    quality = digits_quality(pixels, labels.numpy())
    per_class = config.eval_samples // num_classes
    grid = pixels.reshape(num_classes, per_class, 8, 8)[:, :10].reshape(-1, 8, 8)
    write_grid(grid, num_classes, out / "samples_grid.png")
    result = {**quality, "eval_samples": len(labels), "eval_sampler": config.eval_sampler,
              "eval_steps": config.eval_steps, "eval_cfg_scale": config.eval_cfg_scale,
              "samples_grid": str(out / "samples_grid.png")}
    write_result(result, out / "eval.json")
    print(f"cond_accuracy {quality['cond_accuracy']:.4f}, pixel FD {quality['pixel_fd']:.3f} (real digits' floor "
          f"{quality['pixel_fd_real_floor']:.3f}), diversity {quality['diversity']:.2f} on {len(labels)} samples; "
          f"grid in {out / 'samples_grid.png'}", flush=True)
    return result


def write_grid(pixels: np.ndarray, rows: int, path: Path):
    """Digits (N, 8, 8) in [0, 16] as a PNG grid of ``rows`` rows, replacing ``path`` only once complete."""
    with staged_file(path) as tmp:
        save_grid(pixels_to_uint8(pixels), rows=rows, path=tmp)


def write_result(result: dict, path: Path):
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))


def sample_pixels(config: TrainConfig, model, conditions) -> np.ndarray:
    """Digits (N, 8, 8) in [0, 16] sampled for ``conditions`` (labels or a Caption) with a progress bar."""
    batches = tqdm(range(num_batches(batch_size(conditions), BATCH_SIZE)), desc="final eval sampling", unit="batch",
                   mininterval=1.0)
    objective = objective_for(config.objective, model.config)
    latents = generate(model, objective, conditions, cfg_scale=config.eval_cfg_scale,
                       sampler=config.eval_sampler, steps=config.eval_steps, batch_size=BATCH_SIZE,
                       seed=config.seed, batches=batches)
    return latents_to_pixels(latents)


def final_eval_text(config: TrainConfig, model, meta: dict) -> dict:
    """Text-to-image digits: ``eval_samples`` split over the caption groups of ``digit_captions`` (the training
    phrasings, held-out templates, held-out forms of the digits), equal per digit, cycling through each digit's
    captions of the group; accuracy, pixel FD and diversity per group, and a grid (per digit: 10 samples of each
    group, in that order)."""
    from ..data import digit_captions

    groups = digit_captions.GROUPS
    digits = digit_captions.NUM_CLASSES
    per_digit = config.eval_samples // (len(groups) * digits)
    encoder = load_text_encoder(meta, None, None, "cpu")
    result, grid_rows = {}, []
    for group in groups:
        captions = [digit_captions.group_captions(group, d) for d in range(digits)]
        prompts = [captions[d][i % len(captions[d])] for d in range(digits) for i in range(per_digit)]
        labels = np.arange(digits).repeat(per_digit)
        tokens, mask = encoder.encode(prompts)
        pixels = sample_pixels(config, model, Caption(tokens, mask))
        quality = digits_quality(pixels, labels)
        result["pixel_fd_real_floor"] = quality.pop("pixel_fd_real_floor")
        result.update({f"{key}_{group}": value for key, value in quality.items()})
        grid_rows.append(pixels.reshape(digits, per_digit, 8, 8)[:, :10])
    out = Path(config.out)
    grid = np.concatenate(grid_rows, axis=1).reshape(-1, 8, 8)
    write_grid(grid, digits, out / "samples_grid.png")
    result = {**result, "eval_samples": len(groups) * per_digit * digits, "eval_sampler": config.eval_sampler,
              "eval_steps": config.eval_steps, "eval_cfg_scale": config.eval_cfg_scale,
              "samples_grid": str(out / "samples_grid.png")}
    write_result(result, out / "eval.json")
    accuracies = ", ".join(f"{result[f'cond_accuracy_{group}']:.4f} {group.replace('_', ' ')}" for group in groups)
    print(f"cond_accuracy {accuracies}; grid in {out / 'samples_grid.png'}", flush=True)
    return result

"""End-of-training evaluation of the digits demos: sample grid (one row per class) and cond_accuracy.

The text-to-image demo is prompted with captions: half of the samples with the training phrasings of each
digit, half with held-out phrasings never seen in training (``digit_captions``); the accuracy with which the
independent classifier recognises the digit each prompt names is reported for both halves.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.digits import latents_to_pixels
from ..diffusion import objective_for
from ..eval.digits import conditional_accuracy
from ..eval.grid import save_grid
from ..eval.prompts import load_text_encoder
from ..inference import load_model
from ..model.conditioning import Caption, batch_size
from ..sampling import generate, num_batches
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
    accuracy = conditional_accuracy(pixels, labels.numpy())
    per_class = config.eval_samples // num_classes
    grid = pixels.reshape(num_classes, per_class, 8, 8)[:, :10].reshape(-1, 8, 8)
    save_grid(np.round(grid / 16 * 255).astype(np.uint8), rows=num_classes, path=out / "samples_grid.png")
    result = {"cond_accuracy": accuracy, "eval_samples": len(labels), "eval_sampler": config.eval_sampler,
              "eval_steps": config.eval_steps, "eval_cfg_scale": config.eval_cfg_scale,
              "samples_grid": str(out / "samples_grid.png")}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"cond_accuracy {accuracy:.4f} on {len(labels)} samples; grid in {out / 'samples_grid.png'}", flush=True)
    return result


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
    """Text-to-image digits: ``eval_samples`` / 2 samples prompted with training phrasings, as many with held-out
    phrasings (equal per digit, cycling through its phrasings); accuracy for each half and a grid."""
    from ..data import digit_captions

    per_digit = config.eval_samples // (2 * digit_captions.NUM_CLASSES)
    groups = {"train": digit_captions.train_captions, "heldout": digit_captions.heldout_captions}
    encoder = load_text_encoder(meta, None, None, "cpu")
    result, grid_rows = {}, []
    for group, captions_of in groups.items():
        prompts = [captions_of(d)[i % len(captions_of(d))] for d in range(digit_captions.NUM_CLASSES)
                   for i in range(per_digit)]
        labels = np.arange(digit_captions.NUM_CLASSES).repeat(per_digit)
        tokens, mask = encoder.encode(prompts)
        pixels = sample_pixels(config, model, Caption(tokens, mask))
        result[f"cond_accuracy_{group}_phrasings"] = conditional_accuracy(pixels, labels)
        grid_rows.append(pixels.reshape(digit_captions.NUM_CLASSES, per_digit, 8, 8)[:, :10])
    out = Path(config.out)
    grid = np.concatenate(grid_rows, axis=1).reshape(-1, 8, 8)  # per digit: training, then held-out phrasings
    save_grid(np.round(grid / 16 * 255).astype(np.uint8), rows=digit_captions.NUM_CLASSES,
              path=out / "samples_grid.png")
    result = {**result, "eval_samples": 2 * per_digit * digit_captions.NUM_CLASSES,
              "eval_sampler": config.eval_sampler, "eval_steps": config.eval_steps,
              "eval_cfg_scale": config.eval_cfg_scale, "samples_grid": str(out / "samples_grid.png")}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"cond_accuracy {result['cond_accuracy_train_phrasings']:.4f} on training phrasings, "
          f"{result['cond_accuracy_heldout_phrasings']:.4f} on held-out phrasings; grid in {out / 'samples_grid.png'}",
          flush=True)
    return result

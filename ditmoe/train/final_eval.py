"""End-of-training evaluation of the digits demo: sample grid (one row per class) and cond_accuracy."""

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.digits import latents_to_pixels
from ..diffusion import build_objective
from ..eval.digits import conditional_accuracy
from ..eval.grid import save_grid
from ..inference import load_model
from ..sampling import generate, num_batches
from .config import TrainConfig

BATCH_SIZE = 100  #: Samples per sampling batch: one progress bar update each.


def final_eval(config: TrainConfig) -> dict:
    """Rank 0 samples ``eval_samples`` digits (equal per class) with EMA weights; other ranks return {}."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    out = Path(config.out)
    model, _ = load_model(out, weights="ema")
    num_classes = model.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(config.eval_samples // num_classes)
    batches = tqdm(range(num_batches(len(labels), BATCH_SIZE)), desc="final eval sampling", unit="batch",
                   mininterval=1.0)
    latents = generate(model, build_objective(config.objective), labels, cfg_scale=config.eval_cfg_scale,
                       sampler=config.eval_sampler, steps=config.eval_steps, batch_size=BATCH_SIZE,
                       seed=config.seed, batches=batches)
    pixels = latents_to_pixels(latents)  # (N, 8, 8) in [0, 16]
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

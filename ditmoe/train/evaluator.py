"""Evaluation while training: the validation loss every ``eval_every`` steps and samples every ``sample_every``.

Both are collective and run in eval mode between optimizer steps, then hand the model back exactly as it
was (weights, mode). The validation loss is measured on the EMA and on the trained ("raw") weights; samples
come from the EMA weights, from fixed seeds and conditions, so two runs (or a run and its resume) sample
the same noise. On the embedded digits every sample grid also gets the demo's quality numbers
(``digits_quality``). The seconds spent here are reported as a fraction of the run's wall time.
"""

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.digits import latents_to_pixels, pixels_to_uint8
from ..eval.digits import digits_quality
from ..eval.grid import save_grid
from ..model.conditioning import Condition, batch_size, index_condition
from ..parallel.distributed import all_reduce
from ..sampling import generate
from ..write_errors import staged_file
from .config import TrainConfig
from .validation import ValidationLoss

SAMPLE_BATCH = 100  #: Samples per sampling batch (a fixed size: the same batches on any world size).
GRID_PER_ROW = 10  #: Samples per class (row) in the grid.


class EngineModel:
    """The engine's module as ``generate`` calls it: inputs cast to the training dtype, fp32 outputs."""

    def __init__(self, engine, dtype: torch.dtype):
        self.engine, self.dtype, self.config = engine, dtype, engine.module.config

    def parameters(self):
        return self.engine.module.parameters()

    def __call__(self, x, t, y, drop_labels=None):
        """``drop_labels``: classifier-free guidance's null-condition mask (text models)."""
        return self.engine(x.to(self.dtype), t, _cast(y, self.dtype), drop_labels).float()


def _cast(y: Condition, dtype: torch.dtype) -> Condition:
    return y if not hasattr(y, "tokens") else type(y)(y.tokens.to(dtype), y.mask)


class TrainingEvaluator:
    def __init__(self, config: TrainConfig, engine, ema, objective, dtype: torch.dtype, *, validation_set,
                 sample_conditions, rank: int, world: int, device, writer, manifest: dict):
        """``validation_set``: held-out ``(x, y)`` or None; ``sample_conditions``: ``(conditions, labels)`` of the
        periodic samples (labels: the digit each shows, or None when not digits); ``writer``: rank 0's
        MetricsWriter (None elsewhere); ``manifest``: the training data's (its VAE decodes latent samples)."""
        self.config, self.engine, self.ema, self.objective, self.dtype = config, engine, ema, objective, dtype
        self.rank, self.world, self.device, self.writer = rank, world, device, writer
        self.validation = None if validation_set is None or not config.eval_every else ValidationLoss(
            *validation_set, objective, seed=config.seed, batch_size=config.val_batch_size, rank=rank, world=world,
            device=device)
        self.sample_conditions = sample_conditions if config.sample_every else None
        self.latent_quality = None  # rank 0, latent data: decoding (and FID against eval_ref)
        if self.sample_conditions is not None and self.sample_conditions[1] is None and rank == 0:
            from ..eval.latent_quality import LatentQuality

            self.latent_quality = LatentQuality(manifest, config.eval_ref, device)
        self.started, self.seconds = time.perf_counter(), 0.0

    def after_step(self, step: int) -> dict:
        """Collective, after optimizer step ``step``: the evaluations due now, logged; their record ({} if none)."""
        record = {}
        last = step == self.config.steps
        start = time.perf_counter()
        if self.validation is not None and (step % self.config.eval_every == 0 or last):
            record.update(self.validate())
        if self.sample_conditions is not None and (step % self.config.sample_every == 0 or last):
            record.update(self.sample(step))
        if not record:
            return record
        self.seconds += time.perf_counter() - start
        record = {"step": step, **record, "eval/time_fraction": self.seconds / (time.perf_counter() - self.started)}
        if self.writer is not None:
            self.writer.log(record)
        return record

    @contextlib.contextmanager
    def eval_mode(self, weights: str):
        """The module in eval mode with the ``weights`` ('ema' or 'raw') for the duration."""
        module = self.engine.module
        cuda = [self.device] if torch.device(self.device).type == "cuda" else []
        module.eval()
        try:  # sampling seeds torch's generators: the training run's are restored after
            with torch.random.fork_rng(devices=cuda), \
                    self.ema.swapped_in(module) if weights == "ema" else contextlib.nullcontext():
                yield
        finally:
            module.train()

    def validate(self) -> dict:
        """Validation loss of the EMA ('val_ema/...') and trained ('val/...') weights."""
        record = {}
        model = EngineModel(self.engine, self.dtype)
        for weights, prefix in (("raw", "val"), ("ema", "val_ema")):
            with self.eval_mode(weights):
                values = self.validation(model)
            record.update({f"{prefix}/{key}": value for key, value in values.items()})
        return record

    def sample(self, step: int) -> dict:
        """Samples of the EMA weights for the fixed conditions; rank 0 writes the grid and, on digits, quality."""
        conditions, labels = self.sample_conditions
        with self.eval_mode("ema"):
            latents = self._generate(conditions)
        if self.rank != 0:
            return {}
        if labels is not None:  # the embedded digits: a grid of GRID_PER_ROW samples per class, and quality
            pixels = latents_to_pixels(latents)
            rows = [pixels[labels == c][:GRID_PER_ROW] for c in np.unique(labels)]
            if all(len(row) == GRID_PER_ROW for row in rows):
                self._write_grid(step, pixels_to_uint8(np.concatenate(rows)), len(rows))
            return {f"samples/{key}": value for key, value in digits_quality(pixels, labels).items()}
        images = self.latent_quality.decode(latents)  # (N, H, W, 3) uint8
        rows = min(GRID_PER_ROW, len(images) // GRID_PER_ROW)
        if rows:
            self._write_grid(step, images[:rows * GRID_PER_ROW], rows)
        return {f"samples/{key}": value for key, value in self.latent_quality.quality(images).items()}

    def _generate(self, conditions: Condition) -> torch.Tensor:
        """Collective: latents for ``conditions``; batch b on rank b mod W (every rank runs as many batches),
        summed into one tensor that every rank gets."""
        n = batch_size(conditions)
        total = math.ceil(n / SAMPLE_BATCH)
        # every batch full (the last filled up with the first conditions): equal shapes on every rank for EP
        conditions = index_condition(conditions, torch.arange(total * SAMPLE_BATCH) % n)
        mine = list(range(self.rank, total, self.world))
        owned = len(mine)
        mine += [0] * (math.ceil(total / self.world) - owned)  # a repeated batch keeps the collectives in step
        bar = tqdm(mine, desc=f"sampling ({n} samples)", unit="batch", leave=False, disable=self.rank != 0,
                   mininterval=1.0)
        c = self.engine.module.config
        out = torch.zeros(total * SAMPLE_BATCH, c.in_channels, c.input_size, c.input_size, device=self.device)
        model = EngineModel(self.engine, self.dtype)
        for i, b in enumerate(bar):
            latents = generate(model, self.objective, conditions, cfg_scale=self.config.eval_cfg_scale,
                               sampler=self.config.eval_sampler, steps=self.config.eval_steps,
                               batch_size=SAMPLE_BATCH, seed=self.config.seed, batches=[b])
            if i < owned:  # the repeated batch's output is dropped
                out[b * SAMPLE_BATCH:(b + 1) * SAMPLE_BATCH] = latents.to(self.device)
        return all_reduce(out).cpu()[:n]

    def _write_grid(self, step: int, images: np.ndarray, rows: int):
        """``OUT/samples/step_N.png`` and a TensorBoard image of uint8 ``images`` (N, H, W[, C]) in ``rows`` rows."""
        path = Path(self.config.out) / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        with staged_file(path) as tmp:
            save_grid(images, rows=rows, path=tmp)
        self.writer.add_image("samples", path, step)


def sample_conditions(config: TrainConfig, validation_set, num_classes: int, has_captions: bool):
    """The periodic samples' conditions and their digit labels (None unless the embedded digits): classes in equal
    blocks for class-conditional data; for captioned data the held-out set's captions, cycled (grouped by digit
    on the text digits); None when captioned data has no held-out set."""
    n = config.sample_samples
    if not has_captions:
        labels = np.arange(num_classes).repeat(max(1, n // num_classes))[:n] if n >= num_classes else np.arange(n)
        return torch.from_numpy(labels), labels if config.data == "digits" else None
    if validation_set is None:
        return None
    captions, label_of = validation_set[1], validation_set[2]
    if config.data != "digits-t2i":
        return index_condition(captions, torch.arange(n) % batch_size(captions)), None
    per_digit = max(1, n // num_classes)  # equal per digit, grouped by digit for the grid
    index = torch.cat([torch.nonzero(label_of == d)[:, 0].repeat(per_digit)[:per_digit] for d in range(num_classes)])
    return index_condition(captions, index), label_of[index].numpy()

"""Prompts for sampling text-conditioned models: reading them, the text encoder a checkpoint was trained with,
the captions of N samples, and a sample grid with each row's prompt written beside it."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..model.conditioning import Caption


def read_prompts(prompts: tuple[str, ...] = (), prompts_file: str | None = None) -> list[str]:
    """``--prompt`` items, then the lines of ``--prompts FILE`` (an empty line before the last prompt is refused:
    a prompt's index is its place); ValueError if there are none."""
    found = [p for p in prompts]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {prompts_file}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompts {prompts_file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        while lines and not lines[-1].strip():  # empty lines at the end shift no prompt
            lines.pop()
        empty = [number for number, line in enumerate(lines, 1) if not line.strip()]
        if empty:
            raise ValueError(f"--prompts {prompts_file}: line {empty[0]} is empty (samples are indexed by prompt: "
                             "remove empty lines)")
        found += [line.strip() for line in lines]
    if not found or not all(p.strip() for p in found):
        raise ValueError("a text-conditioned model needs prompts: --prompt TEXT (repeatable) or --prompts FILE "
                         "(one per line), none empty")
    return found


def recorded_text_encoder(meta: dict) -> dict | None:
    """``{"name", "max_length"}`` of the text encoder the checkpoint's data was embedded with, if recorded."""
    recorded = meta.get("text_encoder")
    return dict(recorded) if isinstance(recorded, dict) else None


def load_text_encoder(meta: dict, name: str | None, max_length: int | None, device):
    """The frozen text encoder for sampling: ``name``/``max_length`` when given, else what the checkpoint records."""
    from ..text import TextEncoder  # imports transformers: only for text models

    recorded = recorded_text_encoder(meta) or {}
    name = name or recorded.get("name")
    max_length = max_length or recorded.get("max_length")
    if not name or not max_length:
        raise ValueError("the checkpoint records no text encoder: pass --text-encoder PATH_OR_ID and "
                         "--text-max-length N")
    return TextEncoder.load(name, int(max_length), device=device)


def prompt_captions(prompts: list[str], num_samples: int, encoder) -> tuple[Caption, torch.Tensor]:
    """Captions of ``num_samples`` samples cycling through ``prompts`` (each prompt encoded once) and the
    prompt index (num_samples,) of each sample."""
    index = torch.arange(num_samples) % len(prompts)
    tokens, mask = encoder.encode(prompts)  # (P, L, D), (P, L)
    return Caption(tokens.cpu()[index], mask.cpu()[index]), index


def save_prompt_grid(images: np.ndarray, prompt_index: np.ndarray, prompts: list[str], path, per_row: int = 8,
                     scale: int = 4):
    """One row per prompt (its first ``per_row`` samples, nearest-neighbour upscaled), the prompt written left
    of the row. images: (N, H, W) or (N, H, W, C) uint8."""
    if images.ndim == 3:
        images = images[..., None]
    h, w = images.shape[1] * scale, images.shape[2] * scale
    rows = [images[prompt_index == p][:per_row] for p in range(len(prompts))]
    label_width = 8 + 6 * max(len(p) for p in prompts)  # the default bitmap font is 6 pixels wide
    canvas = Image.new("RGB", (label_width + per_row * (w + 2), len(prompts) * (h + 2) + 2), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, row) in enumerate(zip(prompts, rows)):
        top = 2 + r * (h + 2)
        draw.text((4, top + h // 2 - 5), prompt, fill="black")
        for c, image in enumerate(row):
            tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
            canvas.paste(tile.resize((w, h), Image.NEAREST), (label_width + c * (w + 2), top))
    canvas.save(path)

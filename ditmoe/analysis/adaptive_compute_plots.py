"""EC-DiT's adaptive-compute figure: experts per image token as a heat map over the generated image, drawn with PIL.

One PNG per sample shown (per prompt): rows are the MoE layers, columns the generated sample (first row
only), a few sampling steps and the mean over all steps. Each map is the token grid's expert count, upsampled
(nearest) to the image and alpha-blended over it, whose intensities are squeezed into a middle range so the
colours stay readable (grayscale or RGB; other channel counts, e.g. latents, as the
grayscale mean of the channels); under each map the share of tokens no expert processed. One colour scale
(``turbo``, 0 .. ``vmax`` experts) for every map of the figure, with its legend at the bottom.
"""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .adaptive_compute import AdaptiveCompute, pick_steps

CMAP = "turbo"
ALPHA = 0.6  # weight of the heat map over the image
BASE_RANGE = (64, 192)  # the image's intensities are squeezed into this range under the map: its colours stay legible
MIN_CELL = 96  # images are upscaled (nearest, by a whole factor) to at least this many pixels a side
PAD = 4
LINE = 13  # pixels per line of text
LABEL_WIDTH = 64  # the "block b" column
TITLE_LINES = 2
HEADER_LINES = 2  # column headers: what the column is, and its timestep
LEGEND_HEIGHT = 3 * LINE + 2 * PAD  # the colour bar, its tick labels and its caption
MAP_STEPS = 5  # sampling steps shown by default


def cell_scale(image_size: int) -> int:
    """The whole upscaling factor that makes an image side at least MIN_CELL pixels."""
    return max(1, math.ceil(MIN_CELL / image_size))


def figure_size(num_layers: int, num_columns: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``num_layers`` rows and ``num_columns`` columns of images of
    ``height`` x ``width`` pixels (before upscaling)."""
    scale = cell_scale(max(height, width))
    cell_w, cell_h = width * scale, height * scale
    fig_w = LABEL_WIDTH + num_columns * (cell_w + PAD) + PAD
    fig_h = PAD + (TITLE_LINES + HEADER_LINES) * LINE + num_layers * (cell_h + LINE + PAD) + LEGEND_HEIGHT + PAD
    return fig_w, fig_h


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) uint8 -> (H, W, 3) uint8: gray replicated, RGB kept, other channel counts averaged."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] != 3:
        image = image.astype(np.float32).mean(axis=-1, keepdims=True).round().astype(np.uint8)
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image)


def heat_colors(values: np.ndarray, vmax: float) -> np.ndarray:
    """values (...) in [0, vmax] -> (..., 3) uint8 colours of the colour map."""
    from matplotlib import colormaps

    scaled = np.clip(np.asarray(values, dtype=np.float64) / max(vmax, 1e-9), 0.0, 1.0)
    rgba = np.asarray(colormaps[CMAP](scaled.ravel())).reshape(*scaled.shape, 4)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, counts: np.ndarray, vmax: float, alpha: float = ALPHA) -> np.ndarray:
    """The (g, g) count map upsampled (nearest) to ``image`` (H, W, C) uint8 and blended over it (its intensities
    squeezed into BASE_RANGE): (H, W, 3) uint8."""
    lo, hi = BASE_RANGE
    base = lo + to_rgb(image).astype(np.float32) * ((hi - lo) / 255)
    h, w = base.shape[:2]
    g_h, g_w = counts.shape
    if h % g_h or w % g_w:
        raise ValueError(f"a {g_h}x{g_w} token grid does not tile a {h}x{w} image")
    heat = heat_colors(counts, vmax).repeat(h // g_h, axis=0).repeat(w // g_w, axis=1).astype(np.float32)
    return ((1 - alpha) * base + alpha * heat).round().clip(0, 255).astype(np.uint8)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float, font) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_adaptive_compute_map(ac: AdaptiveCompute, image: np.ndarray, sample: int, path: str | Path,
                              title: tuple[str, str], steps: list[int] | None = None,
                              vmax: float | None = None) -> Path:
    """The figure of sample ``sample`` (its generated ``image`` (H, W, C) uint8) at the sampling ``steps``
    (default: MAP_STEPS evenly spaced) on the colour scale 0..``vmax`` (default: the largest count of ``ac``).
    ``title``: two lines (e.g. the prompt and the settings)."""
    steps = pick_steps(ac.num_steps, MAP_STEPS) if steps is None else list(steps)
    vmax = float(max(1, ac.experts_per_token.max())) if vmax is None else float(vmax)
    h, w = image.shape[:2]
    scale = cell_scale(max(h, w))
    cell_w, cell_h = w * scale, h * scale
    columns = 2 + len(steps)  # the sample, the steps, the mean over the steps
    fig_w, fig_h = figure_size(ac.num_layers, columns, h, w)
    canvas = Image.new("RGB", (fig_w, fig_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    text_w = fig_w - 2 * PAD
    for i, line in enumerate(title[:TITLE_LINES]):
        draw.text((PAD, PAD + i * LINE), _fit(draw, line, text_w, font), fill="black", font=font)
    top = PAD + TITLE_LINES * LINE

    def column_x(c: int) -> int:
        return LABEL_WIDTH + PAD + c * (cell_w + PAD)

    headers = [("sample", ""), *((f"step {s}", f"t={ac.step_timesteps[s]:g}") for s in steps),
               (f"mean of {ac.num_steps}", "steps")]
    for c, lines in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((column_x(c), top + i * LINE), _fit(draw, line, cell_w, font), fill="black", font=font)
    top += HEADER_LINES * LINE

    def paste(array: np.ndarray, c: int, y: int):
        tile = Image.fromarray(to_rgb(array)).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (column_x(c), y))

    counts = ac.experts_per_token[:, :, sample]  # (S, L, g, g)
    for layer, block in enumerate(ac.layer_blocks):
        y = top + layer * (cell_h + LINE + PAD)
        draw.text((PAD, y + cell_h // 2 - LINE // 2), f"block {block}", fill="black", font=font)
        if layer == 0:
            paste(image, 0, y)
        for c, s in enumerate(steps, start=1):
            paste(overlay(image, counts[s, layer], vmax), c, y)
            unprocessed = float((counts[s, layer] == 0).mean())
            draw.text((column_x(c), y + cell_h + 1), _fit(draw, f"none: {unprocessed:.1%}", cell_w, font),
                      fill="black", font=font)
        paste(overlay(image, counts[:, layer].mean(axis=0), vmax), columns - 1, y)
        unprocessed = float((counts[:, layer] == 0).mean())
        draw.text((column_x(columns - 1), y + cell_h + 1), _fit(draw, f"none: {unprocessed:.1%}", cell_w, font),
                  fill="black", font=font)
    _legend(draw, font, fig_w, fig_h - PAD - LEGEND_HEIGHT, vmax, ac)
    path = Path(path)
    canvas.save(path, compress_level=1)
    return path


def _legend(draw: ImageDraw.ImageDraw, font, fig_w: int, top: int, vmax: float, ac: AdaptiveCompute):
    """The colour bar 0..vmax with integer ticks, and what the maps show."""
    left, right = LABEL_WIDTH + PAD, fig_w - PAD
    width = max(right - left, 1)
    bar = heat_colors(np.linspace(0, vmax, width), vmax)  # (width, 3)
    y = top + PAD
    for x, colour in enumerate(bar):
        draw.line([(left + x, y), (left + x, y + LINE - 2)], fill=tuple(int(v) for v in colour))
    ticks = np.unique(np.linspace(0, vmax, min(int(vmax), 8) + 1).round().astype(int))
    for tick in ticks:
        x = left + round(tick / max(vmax, 1e-9) * (width - 1))
        draw.line([(x, y + LINE - 2), (x, y + LINE + 1)], fill="black")
        label = str(tick)
        x = min(max(left, x - draw.textlength(label, font=font) / 2), right - draw.textlength(label, font=font))
        draw.text((x, y + LINE + 1), label, fill="black", font=font)
    what = (f"experts that processed each image token ({ac.routing}, E={ac.num_experts}"
            + (f", C={ac.capacity} tokens per expert" if ac.capacity else "")
            + "); none: share of tokens processed by no expert")
    draw.text((PAD, y + 2 * LINE + 1), _fit(draw, what, fig_w - 2 * PAD, font), fill="black", font=font)


def save_adaptive_compute_maps(ac: AdaptiveCompute, images: np.ndarray, groups: list[tuple[str, np.ndarray]],
                               out_dir: str | Path, title: str, num_steps: int = MAP_STEPS,
                               prefix: str = "adaptive_compute_prompt") -> list[Path]:
    """One figure per group (name, sample indices), of the group's first sample: ``{prefix}{g}.png``.
    ``images``: (N, H, W, C) uint8 generated samples. All figures share the colour scale."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = pick_steps(ac.num_steps, num_steps)
    vmax = max(1, int(ac.experts_per_token.max()))
    paths = []
    for g, (name, index) in enumerate(groups):
        sample = int(index[0])
        paths.append(save_adaptive_compute_map(ac, images[sample], sample, out_dir / f"{prefix}{g}.png",
                                               (name, f"{title}, sample {sample}"), steps, vmax))
    return paths

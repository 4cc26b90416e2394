"""Heatmaps of expert-selection frequency (paper §3.3, Figures 5-7), drawn with matplotlib's Agg canvas.

Per MoE layer: experts x classes, experts x sampling steps, and one patch-grid map per expert;
plus an overview of every layer. Colour scales span each figure's own data range (see the colorbars),
so small differences stay visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .routing_stats import RoutingStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CMAP = "viridis"
MAX_ANNOTATED_CELLS = 400  # heatmaps this small get their values written in the cells
MAX_ANNOTATED_COLUMNS = 25
MAX_ANNOTATED_PATCHES = 64  # patch grids up to 8 x 8
MAX_LABELLED_CLASSES = 30  # more classes get matplotlib's own ticks (class ids, null last)
DPI = 100
EC_NOTE = "expert choice: every expert takes C tokens of each sample, so its load is the same for every class and step"


def save_routing_plots(stats: RoutingStats, out_dir: str | Path, title: str) -> list[Path]:
    """Write ``overview.png`` and ``block{b}_{class,step,position}.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"overview.png": plot_overview(stats, title)}
    for layer, block in enumerate(stats.layer_blocks):
        figures[f"block{block}_class.png"] = plot_by_class(stats, layer, title)
        figures[f"block{block}_step.png"] = plot_by_step(stats, layer, title)
        figures[f"block{block}_position.png"] = plot_by_position(stats, layer, title)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=DPI, pil_kwargs={"compress_level": 1})
        paths.append(out_dir / name)
    return paths


def plot_by_class(stats: RoutingStats, layer: int, title: str) -> Figure:
    """Experts x classes (the null label last, when the sampler used guidance)."""
    freq = stats.frequency("class")[layer]  # (K+1, E)
    classes = np.flatnonzero(stats.tokens_by_class)
    labels = [stats.value_labels("class")[k] for k in classes] if len(classes) <= MAX_LABELLED_CLASSES else None
    size = (min(16.0, max(7.0, 0.45 * len(classes) + 2.5)), 2.4 + 0.45 * stats.num_experts)
    fig = _figure(size)
    ax = fig.add_subplot()
    _heatmap(fig, ax, freq[classes].T, labels, _expert_labels(stats))
    ax.set_xlabel("class label (null = unconditional half of classifier-free guidance)")
    ax.set_ylabel("expert")
    _suptitle(fig, stats, title, layer, "expert selection frequency by class", ec_note=True)
    return fig


def plot_by_step(stats: RoutingStats, layer: int, title: str) -> Figure:
    """Experts x sampling steps (noisy to clean); for expert choice also the experts-per-token histogram."""
    freq = stats.frequency("step")[layer]  # (S, E)
    panels = 2 if stats.routing == "expert_choice" else 1
    width = min(14.0, max(7.0, 0.3 * len(stats.step_timesteps) + 3))
    fig = _figure((width, (1.4 + 0.4 * stats.num_experts) * panels + 1.2))
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    _heatmap(fig, axes[0], freq.T, None, _expert_labels(stats))
    axes[0].set_ylabel("expert")
    if panels == 2:
        coverage = stats.coverage[layer] / np.maximum(stats.tokens_by_step[:, None], 1)  # (S, E+1)
        _heatmap(fig, axes[1], coverage.T, None, [str(j) for j in range(stats.num_experts + 1)],
                 cbar_label="fraction of tokens")
        axes[1].set_ylabel("experts per token")
        axes[1].set_title("share of tokens processed by 0, 1, ..., E experts", fontsize=9)
    for ax in axes:
        _step_ticks(ax, stats.step_timesteps)
    axes[-1].set_xlabel("sampling step (noise -> image); t = model timestep")
    _suptitle(fig, stats, title, layer, "expert selection frequency by sampling step", ec_note=True)
    return fig


def plot_by_position(stats: RoutingStats, layer: int, title: str) -> Figure:
    """One patch-grid map per expert on a shared colour scale; for expert choice also experts per token."""
    g, e = stats.grid_size, stats.num_experts
    freq = stats.frequency("position")[layer].T.reshape(e, g, g)  # (E, g, g)
    cols = min(e, 4)
    rows = -(-e // cols)
    extra = stats.routing == "expert_choice"
    fig = _figure((2.5 * (cols + extra) + 1.0, 2.6 * rows + 1.0))
    experts_fig, token_fig = fig.subfigures(1, 2, width_ratios=[cols, 1]) if extra else (fig, None)
    axes = experts_fig.subplots(rows, cols, squeeze=False).flatten()
    vmin, vmax = _limits(freq)
    for i, ax in enumerate(axes[:e]):
        image = _grid_map(ax, freq[i], vmin, vmax, f"expert {i}", ylabel=i % cols == 0, xlabel=i + cols >= e)
    experts_fig.colorbar(image, ax=list(axes[:e]), label="selection frequency")
    for ax in axes[e:]:
        ax.axis("off")
    if extra:
        ax = token_fig.subplots()
        per_token = freq.sum(axis=0)  # (g, g)
        token_fig.colorbar(_grid_map(ax, per_token, *_limits(per_token), "experts per token"), ax=ax, shrink=0.6)
    _suptitle(fig, stats, title, layer, "expert selection frequency by patch position")
    return fig


def _grid_map(ax, grid: np.ndarray, vmin: float, vmax: float, name: str, ylabel: bool = True, xlabel: bool = True):
    """One (g, g) patch-grid map, row 0 at the top as in the image."""
    from matplotlib.ticker import MaxNLocator

    image = ax.imshow(grid, cmap=CMAP, vmin=vmin, vmax=vmax)
    if grid.size <= MAX_ANNOTATED_PATCHES:
        _annotate(ax, grid, vmin, vmax)
    ax.set_title(f"{name} (mean {grid.mean():.2f})", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if xlabel:
        ax.set_xlabel("patch column", fontsize=8)
    if ylabel:
        ax.set_ylabel("patch row", fontsize=8)
    return image


def plot_overview(stats: RoutingStats, title: str) -> Figure:
    """Every layer: overall frequency and how much it varies across classes, steps and positions."""
    blocks = [f"block {b}" for b in stats.layer_blocks]
    panels = [("selection frequency", stats.overall_frequency(), "selection frequency")]
    panels += [(f"range over {name}", stats.frequency_range(factor), "max - min of the frequency")
               for factor, name in (("class", "classes"), ("step", "steps"), ("position", "positions"))]
    panel_width = max(3.4, 0.25 * stats.num_experts + 2.0)
    fig = _figure((panel_width * len(panels) + 1.0, 2.0 + 0.4 * len(blocks)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, data, cbar_label) in zip(axes, panels):
        _heatmap(fig, ax, data, _expert_labels(stats), blocks, cbar_label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
    note = f"\n{EC_NOTE}" if stats.routing == "expert_choice" else ""
    fig.suptitle(f"{title}\nrouting over all MoE layers{note}", fontsize=9)
    return fig


def _figure(size: tuple[float, float]) -> Figure:
    """An empty figure of ``size`` inches with matplotlib's constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _heatmap(fig: Figure, ax, data: np.ndarray, xlabels, ylabels, cbar_label: str = "selection frequency"):
    """data: (rows, cols); labels None leaves matplotlib's ticks."""
    vmin, vmax = _limits(data)
    image = ax.imshow(data, cmap=CMAP, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if data.size <= MAX_ANNOTATED_CELLS and data.shape[1] <= MAX_ANNOTATED_COLUMNS:
        _annotate(ax, data, vmin, vmax)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    fig.colorbar(image, ax=ax, label=cbar_label)


def _annotate(ax, data: np.ndarray, vmin: float, vmax: float):
    for (r, c), value in np.ndenumerate(data):
        dark = (value - vmin) / (vmax - vmin) < 0.6
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black",
                in_layout=False)


def _limits(data: np.ndarray) -> tuple[float, float]:
    """The data range, widened when flat so a constant map still gets a colour scale."""
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    pad = max(1e-3, 0.01 * abs(hi)) if hi - lo < 1e-9 else 0.0
    return lo - pad, hi + pad


def _step_ticks(ax, timesteps: np.ndarray):
    count = len(timesteps) if len(timesteps) <= 12 else 8
    picks = np.unique(np.linspace(0, len(timesteps) - 1, count).round().astype(int))
    ax.set_xticks(picks, [f"{s}\nt={timesteps[s]:.4g}" for s in picks], fontsize=7)


def _expert_labels(stats: RoutingStats) -> list[str]:
    return [str(e) for e in range(stats.num_experts)]


def _suptitle(fig: Figure, stats: RoutingStats, title: str, layer: int, what: str, ec_note: bool = False):
    note = f"\n{EC_NOTE}" if ec_note and stats.routing == "expert_choice" else ""
    fig.suptitle(f"{title}\nblock {stats.layer_blocks[layer]} ({stats.routing}): {what}{note}", fontsize=9)

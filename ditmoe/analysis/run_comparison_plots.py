"""The figure of ``tools/compare_runs.py``: each group's evaluation curves against step and training FLOPs."""

from pathlib import Path

from .run_comparison import CURVES


def plot(groups: dict, path: Path):
    """The figure at ``path``: a row per curve of CURVES, columns step and training FLOPs; each group of runs
    (``group_runs``) drawn as its mean, the range between its runs shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(CURVES), 2, figsize=(11, 4 * len(CURVES)), squeeze=False)
    for row, (key, label) in enumerate(CURVES):
        for name, members in groups.items():
            steps = sorted(set.intersection(*(set(s for s, _ in run.curves.get(key, [])) for run in members)))
            if not steps:
                continue
            values = [[dict(run.curves[key])[s] for s in steps] for run in members]  # (runs, steps)
            mean = [sum(column) / len(column) for column in zip(*values)]
            low, high = [min(column) for column in zip(*values)], [max(column) for column in zip(*values)]
            flops = [s * members[0].train_gflops_per_step * 1e9 for s in steps]
            for ax, x in ((axes[row][0], steps), (axes[row][1], flops)):
                line, = ax.plot(x, mean, marker="o", markersize=3, label=f"{name} ({len(members)} runs)")
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        for column, xlabel in enumerate(("training step", "training FLOPs")):
            ax = axes[row][column]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

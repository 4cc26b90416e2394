"""Compare training runs: one figure of their evaluation curves and a markdown table of final values.

    python tools/compare_runs.py RUN [RUN ...] --out compare/

Writes ``OUT/compare.png``: the validation loss (EMA weights) and the pixel FD of the periodic samples
(digits data), each against training step and against training FLOPs (from the model card: 3 forward
passes' FLOPs per trained sample, attention included). Runs that differ only in seed form one group,
drawn as the mean over its runs with the range between them shaded. ``OUT/compare.md`` holds the table:
per group its seeds, parameters, training FLOPs, final curve values and final evaluation (``eval.json``),
as mean ± standard deviation over the seeds.
"""

from pathlib import Path

from ditmoe.analysis.run_comparison import CURVES, group_runs, markdown_table, read_run
from ditmoe.cli import make_parser, user_errors


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training output folders (OUT of ditmoe.train)")
    parser.add_argument("--out", required=True, help="folder for compare.png and compare.md")
    return parser


def plot(groups: dict, path: Path):
    """The 2×2 figure: rows are CURVES, columns step and training FLOPs."""
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors():
        groups = group_runs([read_run(run) for run in args.runs])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = markdown_table(groups)
        (out / "compare.md").write_text(table)
        plot(groups, out / "compare.png")
    print(table, end="")
    print(f"figure: {out / 'compare.png'}; table: {out / 'compare.md'}")


if __name__ == "__main__":
    main()

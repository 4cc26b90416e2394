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

from ditmoe.analysis.run_comparison import group_runs, markdown_table, read_run
from ditmoe.analysis.run_comparison_plots import plot
from ditmoe.cli import make_parser, user_errors


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training output folders (OUT of ditmoe.train)")
    parser.add_argument("--out", required=True, help="folder for compare.png and compare.md")
    return parser


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

"""tools/compare_runs.py on real tiny runs: the figure, the table over seeds, and clear errors."""

import json

import pytest

from ditmoe.analysis.run_comparison import group_runs, mean_std, read_run

from conftest import SMALL_DIGITS, eval_records, load_tool, run_cli

pytestmark = pytest.mark.slow  # its fixture trains two runs


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs = []
    for seed in (0, 1):
        out = root / f"tiny-seed{seed}"
        run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "4", "--seed", str(seed), "--set", "eval_every=2",
                 "--set", "sample_every=4", "--set", "sample_samples=100", "--out", str(out)])
        runs.append(out)
    return runs


def test_compare_runs_writes_the_figure_and_the_table(two_seeds, tmp_path, capsys):
    load_tool("compare_runs").main([*map(str, two_seeds), "--out", str(tmp_path / "cmp")])
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table in capsys.readouterr().out
    header, rule, row = table.splitlines()
    assert row.startswith("| tiny | 0, 1 | ")  # one group: the runs differ only in seed
    finals = [eval_records(run)[-1] for run in two_seeds]
    mean, std = mean_std([r["val_ema/loss"] for r in finals])
    assert std > 0 and f"{mean:.4f} ± {std:.4f}" in row
    fd = mean_std([r["samples/pixel_fd"] for r in finals])
    assert f"{fd[0]:.4f} ± {fd[1]:.4f}" in row
    flops = read_run(two_seeds[0]).train_gflops_per_step * 1e9 * 4
    assert f"| {flops:.3g} | 4 |" in row


def test_runs_group_by_everything_but_the_seed(two_seeds, tmp_path):
    other = tmp_path / "wider"
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2", "--set", "eval_every=2", "--set",
             "model.hidden_size=48", "--out", str(other)])
    groups = group_runs([read_run(r) for r in [*two_seeds, other]])
    assert {name: len(runs) for name, runs in groups.items()} == {"tiny": 2, "wider": 1}
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([5.0]) == (5.0, 0.0)


def test_a_folder_that_is_not_a_run_is_a_clear_error(two_seeds, tmp_path):
    with pytest.raises(SystemExit, match=f"error: {tmp_path}: not a training run"):
        load_tool("compare_runs").main([str(two_seeds[0]), str(tmp_path), "--out", str(tmp_path / "cmp")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"train": {}}))
    with pytest.raises(SystemExit, match="config.json: not a run's config.json"):
        load_tool("compare_runs").main([str(broken), "--out", str(tmp_path / "cmp")])

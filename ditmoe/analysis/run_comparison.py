"""Comparing training runs: their evaluation curves against step and training FLOPs, grouped over seeds.

A run is an ``OUT`` folder of ``python -m ditmoe.train``: ``config.json`` (settings and model config),
``metrics.jsonl`` (evaluation records: ``val_ema/loss``, ``samples/pixel_fd``, ...) and, after a digits
demo's final evaluation, ``eval.json``. Runs whose settings differ only in seed, output folder and
resume flags form one group: the table gives each group's final values as mean ± standard deviation
over its runs, the figure each group's mean with the range over its runs.
"""

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..model import DiTConfig
from ..model.card import model_card

#: Curves of the figure and columns of the table: (metrics key, label).
CURVES = (("val_ema/loss", "validation loss (EMA)"), ("samples/pixel_fd", "pixel FD"))
#: Final-evaluation numbers of ``eval.json`` in the table.
FINAL = ("cond_accuracy", "pixel_fd", "diversity")
#: Settings that never make two runs different experiments.
NOT_THE_EXPERIMENT = ("seed", "out", "resume", "overwrite", "resume_universal", "resume_changes", "config_format")


@dataclass
class Run:
    path: Path
    train: dict
    model: dict
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    final: dict = field(default_factory=dict)  # eval.json

    @functools.cached_property
    def card(self) -> dict:
        """The model card of the run's model (parameters and FLOPs), built once."""
        return model_card(DiTConfig.from_dict(self.model))

    @property
    def train_gflops_per_step(self) -> float:
        """Training FLOPs of one optimizer step in GFLOPs: 3 forward passes' worth (forward and backward) per
        sample of the global batch, attention included (``model_card``'s ``gflops_full``)."""
        return 3 * self.card["gflops_full"] * self.train["global_batch_size"]

    @property
    def params(self) -> dict:
        return {"total": self.card["params_total_M"], "activated": self.card["params_activated_M"]}

    def experiment(self) -> str:
        """The settings that make the experiment (JSON, sorted): all but seed, folder and resume flags."""
        train = {k: v for k, v in self.train.items() if k not in NOT_THE_EXPERIMENT}
        return json.dumps({"train": train, "model": self.model}, sort_keys=True)


def read_run(path) -> Run:
    """The run in folder ``path``; ValueError naming the file when it is not one."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a training run (no config.json)")
    try:
        config = json.loads(config_file.read_text())
        run = Run(path, config["train"], config["model"])
    except (ValueError, KeyError) as err:
        raise ValueError(f"{config_file}: not a run's config.json ({err})") from None
    metrics = path / "metrics.jsonl"
    for number, line in enumerate(metrics.read_text().splitlines() if metrics.is_file() else [], 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{metrics}: line {number} is not JSON") from None
        for key, _ in CURVES:
            if isinstance(record.get(key), (int, float)):
                run.curves.setdefault(key, []).append((int(record["step"]), float(record[key])))
    if (path / "eval.json").is_file():
        run.final = json.loads((path / "eval.json").read_text())
    return run


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by experiment, each group named by its first run's folder with a trailing seed suffix
    (``-seed1``, ``_s2``) removed; groups keep the order of their first run."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.experiment(), []).append(run)
    named = {}
    for members in groups.values():
        name = _strip_seed(members[0].path.name)
        while name in named:
            name += "'"
        named[name] = members
    return named


def _strip_seed(name: str) -> str:
    for separator in ("-seed", "_seed", "-s", "_s"):
        stem, found, tail = name.rpartition(separator)
        if found and tail.isdigit() and stem:
            return stem
    return name


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def final_value(run: Run, key: str) -> float | None:
    points = run.curves.get(key)
    return points[-1][1] if points else None


def _cell(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown_table(groups: dict[str, list[Run]]) -> str:
    """One row per group: runs, parameters, training FLOPs, final curve values and final evaluation, each as
    mean ± standard deviation over the group's runs."""
    header = ["run", "seeds", "params (M, total / activated)", "train FLOPs", "final step"]
    header += [f"final {label}" for _, label in CURVES] + [f"eval {key}" for key in FINAL]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, members in groups.items():
        first = members[0]
        steps = [final_step(run) for run in members]
        cells = [name, ", ".join(str(run.train["seed"]) for run in members),
                 f"{first.params['total']:.3f} / {first.params['activated']:.3f}",
                 f"{first.train_gflops_per_step * 1e9 * max(steps):.3g}", str(max(steps))]
        cells += [_cell([final_value(run, key) for run in members], 4) for key, _ in CURVES]
        cells += [_cell([run.final.get(key) for run in members], 3) for key in FINAL]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def final_step(run: Run) -> int:
    """The last evaluated step (the configured steps when the run has no evaluation records)."""
    return max((points[-1][0] for points in run.curves.values()), default=run.train["steps"])

"""Metrics sink: one JSON line per logged step, the same scalars to TensorBoard.

The lines are strict JSON: a NaN or infinite value is written as ``null``. A resumed run first drops the
records (and TensorBoard events) after the step it resumes from, so each step appears once.
"""

import json
import math
from pathlib import Path


def strict_json(value):
    """``value`` with every non-finite float (nested in lists too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def truncate_records(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to ``last_step`` (and drop a torn last line of a killed run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break  # the line a killed run was writing
        if record.get("step", 0) > last_step:
            break
        kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int = 0):
        """Append to ``out_dir/metrics.jsonl`` after the records up to ``resume_step`` (0: a fresh run)."""
        self.path = out_dir / "metrics.jsonl"
        truncate_records(self.path, resume_step)
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict):
        """``record`` has 'step' and scalars; list values go to JSON only, their summaries to TensorBoard."""
        record = {key: strict_json(value) for key, value in record.items()}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def expert_load_stats(tokens_per_expert: list[list[float]], moe_block_ids: list[int]) -> dict:
    """Per MoE layer: load fractions, their coefficient of variation and max/mean ratio."""
    stats = {}
    for block, counts in zip(moe_block_ids, tokens_per_expert):
        total = sum(counts)
        frac = [c / total for c in counts] if total else [0.0] * len(counts)
        mean = 1.0 / len(counts)
        var = sum((f - mean) ** 2 for f in frac) / len(frac)
        stats[f"moe/block{block}/load"] = frac
        stats[f"moe/block{block}/load_cv"] = math.sqrt(var) / mean
        stats[f"moe/block{block}/load_max_over_mean"] = max(frac) / mean
    return stats

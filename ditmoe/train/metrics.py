"""Metrics sink: one JSON line per logged step, the same scalars to TensorBoard."""

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict):
        """``record`` has 'step' and scalars; list values go to JSON only, their summaries to TensorBoard."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
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

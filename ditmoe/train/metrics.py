"""Metrics sink: one JSON line per logged step, the same scalars to TensorBoard.

The lines are strict JSON: a NaN or infinite value is written as ``null``. A resumed run first drops the
records (and TensorBoard events) after the step it resumes from, so each step appears once. A write that fails
(a full disk) is one ``WriteFailed`` naming the file, and leaves no torn line: the records before stay intact.
"""

import json
import math
import os
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

from ..write_errors import writing


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
    with writing(path, tmp):
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes events in a thread of its own, which prints a traceback when a write fails; the writer
    raises the same error again in the training thread at its next flush, where MetricsWriter names the file.
    Keep that thread quiet (other threads' errors are printed as before)."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.quiet_tensorboard = True
    threading.excepthook = hook


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int = 0):
        """Append to ``out_dir/metrics.jsonl`` after the records up to ``resume_step`` (0: a fresh run)."""
        self.path = out_dir / "metrics.jsonl"
        truncate_records(self.path, resume_step)
        self.file = self.path.open("ab", buffering=0)  # unbuffered: a failed write is undone at once (_append)
        self.failed = False  # a write failed (and raised): close() does not raise it again
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            with self._writing(out_dir / "tensorboard"):
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict):
        """``record`` has 'step' and scalars; list values go to JSON only, their summaries to TensorBoard."""
        record = {key: strict_json(value) for key, value in record.items()}
        self._append(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is None:
            return
        step = record["step"]
        with self._writing(self.tb.get_logdir()):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def _append(self, line: str):
        """Append ``line`` to metrics.jsonl whole: a write that fails part-way is cut off again."""
        size = os.fstat(self.file.fileno()).st_size
        with self._writing(self.path):
            try:
                data = memoryview(line.encode())
                while data:
                    data = data[self.file.write(data):]
            except BaseException:
                with suppress(OSError):
                    self.file.truncate(size)
                raise

    @contextmanager
    def _writing(self, path):
        """``writing(path)`` that remembers a failure, so that :meth:`close` does not report it twice."""
        try:
            with writing(path):
                yield
        except BaseException:
            self.failed = True
            raise

    def add_image(self, tag: str, png_path: Path, step: int):
        """The PNG at ``png_path`` as TensorBoard image ``tag`` of ``step`` (nothing without TensorBoard)."""
        if self.tb is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as image:
            pixels = np.asarray(image.convert("RGB"))
        with self._writing(self.tb.get_logdir()):
            self.tb.add_image(tag, pixels, step, dataformats="HWC")
            self.tb.flush()

    def close(self):
        """Close both sinks. After a failed write (raised already), closing TensorBoard fails too: not raised."""
        self.file.close()
        if self.tb is None:
            return
        try:
            with writing(self.tb.get_logdir()):
                self.tb.close()
        except OSError:
            if not self.failed:
                raise


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

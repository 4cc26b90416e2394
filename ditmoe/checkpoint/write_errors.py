"""Say what went wrong when a checkpoint could not be written: a full device or quota, not a raw
ENOSPC or a C++ stream error from ``torch.save``."""

import errno
import os
import shutil
from pathlib import Path

# torch.save reports a failed write as a RuntimeError without errno ("PytorchStreamWriter failed
# writing file ...: file write failed", "unexpected pos 473216 vs 473104", "basic_ios::clear").
TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos", "basic_ios", "iostream error")
REASONS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}


def write_failure(err: Exception, path: Path) -> str | None:
    """What went wrong when ``err`` was raised writing ``path``; None if ``err`` is not a failed write."""
    if isinstance(err, OSError) and err.errno in REASONS:
        return f"{REASONS[err.errno]} on {mount_point(path)} writing {path}"
    if isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_WRITE_FAILURES):
        if _is_full(path):
            return f"no space left on {mount_point(path)} writing {path}"
        return f"could not write {path} on {mount_point(path)} ({str(err).splitlines()[0]})"
    return None


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path``, which names the device in messages."""
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path):
        path = path.parent
    return path


def _is_full(path: Path) -> bool:
    """Less than 1% (at most 64 MiB) of the device left: a write that failed there ran out of space."""
    usage = shutil.disk_usage(mount_point(path))
    return usage.free < min(64 << 20, usage.total // 100)

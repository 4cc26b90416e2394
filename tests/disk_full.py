"""A full disk on demand: a small tmpfs mounted on a test's folder, filled up to a given number of free bytes."""

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

FILLER = ".filler"  # the file fill() writes


@contextmanager
def tmpfs(directory: Path, size: int):
    """A tmpfs of ``size`` bytes mounted on ``directory`` (skips the test where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def fill(directory: Path, leave: int = 0) -> None:
    """Write ``directory/.filler`` so that the file system of ``directory`` has ``leave`` bytes free (rounded down to
    whole blocks); on a tmpfs a file takes whole pages, so a file of up to ``leave`` bytes still fits, and no more."""
    block = os.statvfs(directory).f_frsize
    leave = leave // block * block
    size = free_bytes(directory) - leave
    assert size >= 0, f"{directory} has only {free_bytes(directory)} bytes free, fewer than {leave}"
    with open(directory / FILLER, "ab") as f:
        f.write(b"\0" * size)  # real bytes: a tmpfs gives holes no pages
    assert free_bytes(directory) == leave


def pages(*files: Path, block: int = 4096) -> int:
    """The bytes ``files`` take on a tmpfs: each rounded up to whole pages."""
    return sum(-(-f.stat().st_size // block) * block for f in files)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``folder`` (but the filler): to compare before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != FILLER}

"""Say what went wrong when a file could not be written, and leave no partial file behind.

A full device or quota surfaces in many shapes: ``OSError`` with ENOSPC/EDQUOT but no path, ``torch.save``'s
C++ stream errors (``[enforce fail at inline_container.cc:...] ... unexpected pos``), safetensors'
``SafetensorError`` (``... (os error 28)``), numpy's ``OSError("N requested and M written")``. Every write path
of ditmoe (checkpoints, metrics, latent shards, samples, exports, upcycled weights) turns them into one line
naming the file: ``no space left on MOUNT writing PATH``.

Imports nothing else of ditmoe, so that every part may use it.
"""

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# torch.save reports a failed write as a RuntimeError without errno ("PytorchStreamWriter failed
# writing file ...: file write failed", "unexpected pos 473216 vs 473104", "basic_ios::clear");
# numpy's tofile as an OSError without errno ("40000 requested and 8176 written").
STREAM_FAILURE = re.compile(r"file write failed|unexpected pos|basic_ios|iostream error|\d+ requested and \d+ written")
REASONS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
# Rust's io::Error as safetensors words it: "I/O error: No space left on device (os error 28)"
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteFailed(OSError):
    """A file could not be written; the message says why and names the file."""


def write_failure(err: BaseException, path: Path) -> str | None:
    """What went wrong when ``err`` was raised writing ``path``; None if ``err`` is not a failed write.

    Call it before removing what the failed write left: a stream error without errno counts as a full
    device only while the device is still full."""
    path = Path(path)
    if isinstance(err, OSError) and err.errno in REASONS:
        return f"{REASONS[err.errno]} on {mount_point(path)} writing {path}"
    code = RUST_OS_ERROR.search(str(err)) if type(err).__name__ == "SafetensorError" else None
    if code and int(code[1]) in REASONS:
        return f"{REASONS[int(code[1])]} on {mount_point(path)} writing {path}"
    if isinstance(err, (OSError, RuntimeError)) and STREAM_FAILURE.search(str(err)):
        if _is_full(path):
            return f"no space left on {mount_point(path)} writing {path}"
        return f"could not write {path} on {mount_point(path)} ({str(err).splitlines()[0]})"
    return None


def remove(*paths: Path) -> None:
    """Delete each of ``paths`` that exists (a file or a folder with its content); errors are ignored."""
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


@contextmanager
def writing(path: str | Path, *partial: str | Path) -> Iterator[None]:
    """Run a block that writes ``path``: a failed write becomes :class:`WriteFailed` naming ``path``, and
    ``partial`` (files or folders the block writes that are complete only when it succeeds) are removed
    when the block fails, whatever the error. Other errors pass through unchanged."""
    try:
        yield
    except BaseException as err:
        failure = None if isinstance(err, WriteFailed) else write_failure(err, Path(path))
        remove(*partial)
        if failure is None:
            raise
        raise WriteFailed(failure) from err


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, with its suffix (so that writers that pick the format from it still do),
    that replaces ``path`` when the block succeeds. If the block fails, the temporary file is removed, ``path``
    is as it was, and a failed write is :class:`WriteFailed` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    with writing(path, tmp):
        yield tmp
        os.replace(tmp, path)


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

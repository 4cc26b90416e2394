"""Streaming ``.npz`` files (the ADM sample and reference-batch format) that are too large to hold in memory.

One writer (``NpzWriter``: ``np.savez``-compatible, .npy format 1.0 headers, written under a temporary
name and renamed when complete) and one reader (``open_array``: .npy format 1.0 and 2.0, streamed rows).
"""

import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def write_npy_header(f, shape: tuple, dtype) -> None:
    """The .npy header of a C-ordered array of ``shape`` and ``dtype``; its raw bytes follow."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)


class NpzWriter:
    """An npz written member by member, as ``with NpzWriter(path) as npz: npz.add(...)``. It is written to
    ``PATH.tmp`` and renamed on success, so ``path`` is either complete or untouched; a failure removes
    ``PATH.tmp``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._zip = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self._tmp, "w", allowZip64=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        done = False
        try:
            self._zip.close()
            if exc_type is None:
                self._tmp.replace(self.path)
                done = True
        except Exception:
            if exc_type is None:
                raise  # else closing after a failed write failed too: the first error says what went wrong
        finally:
            if not done:
                self._tmp.unlink(missing_ok=True)

    def add(self, name: str, array: np.ndarray) -> None:
        """Member ``name``: the whole ``array``."""
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

    def add_chunks(self, name: str, shape: tuple, dtype, chunks: Iterable[np.ndarray]) -> None:
        """Member ``name`` of ``shape`` and ``dtype``, from ``chunks`` of rows that arrive one after another."""
        rows = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            write_npy_header(f, shape, dtype)
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"{self.path}: {name} got {rows} rows, its header says {shape[0]}")


def npz_keys(path: str | Path) -> list[str]:
    """Names of the arrays in the npz at ``path``, after checking that it is one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: corrupt .npz file: {err}") from None


def check_npz(path: str | Path) -> None:
    """Read the whole npz at ``path`` once, so that damage is found before any work: every member must
    pass its CRC check, and every ``.npy`` member must have a readable header and as many bytes as it
    says. ValueError names the file and the member."""
    npz_keys(path)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            try:
                _check_member(archive, info)
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
                raise ValueError(f"{path}: corrupt .npz file: {info.filename}: {err}") from None


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, chunk: int = 1 << 24) -> None:
    """Read member ``info`` to its end (zipfile checks the CRC there); for a .npy, check its size."""
    with archive.open(info) as member:
        expected = None
        if info.filename.endswith(".npy"):
            version = np.lib.format.read_magic(member)
            if version not in READ_HEADER:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = READ_HEADER[version](member)
            if dtype.hasobject:
                raise ValueError("holds Python objects, not numbers")
            expected = int(np.prod(shape)) * dtype.itemsize
        size = 0
        while data := member.read(chunk):
            size += len(data)
        if expected is not None and size != expected:
            raise ValueError(f"{size} bytes of data, its header says {expected}")


@dataclass
class ArrayStream:
    """One array of an open npz, read from just after its header."""

    path: str
    name: str
    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    member: object

    def check_c_order(self) -> None:
        """Rows can be streamed only from a C-ordered array."""
        if self.fortran_order:
            raise ValueError(f"{self.path}: {self.name} is stored in Fortran order; save a C-ordered array")

    def batches(self, rows: int) -> Iterator[np.ndarray]:
        """The array ``rows`` rows at a time (the last batch possibly shorter)."""
        self.check_c_order()
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        for start in range(0, self.shape[0], rows):
            count = min(rows, self.shape[0] - start)
            data = self.member.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ValueError(f"{self.path}: {self.name} is truncated")
            yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape(count, *self.shape[1:])


@contextmanager
def open_array(path: str | Path, name: str = "arr_0") -> Iterator[ArrayStream]:
    """Array ``name`` of the npz at ``path``, its header read and its rows streamed on demand."""
    keys = npz_keys(path)
    if name not in keys:
        raise ValueError(f"{path}: no {name} array (it has {', '.join(keys) or 'none'})")
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version not in READ_HEADER:
            raise ValueError(f"{path}: {name} has unsupported .npy format version {version}")
        shape, fortran_order, dtype = READ_HEADER[version](member)
        yield ArrayStream(str(path), name, shape, dtype, fortran_order, member)

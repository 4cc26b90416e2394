"""Read a checkpoint file without running code from it: ``torch.load(weights_only=True)`` onto the CPU,
with one ValueError naming the file when it is truncated, corrupt or holds a pickled object."""

import pickle
import re
import zipfile
from pathlib import Path

import torch

# How torch's weights_only unpickler names a global it refused ("... GLOBAL posix.system was not ...").
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_load(file: str | Path, *, allow: list[type] = (), mmap: bool = False):
    """``file``'s tensors and plain data (and instances of the types in ``allow``).

    ``mmap``: map the tensors instead of reading them (for files in ``torch.save``'s zip format; other
    files are read)."""
    file = Path(file)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise ValueError(f"checkpoint file {file}: ditmoe refuses to unpickle non-tensor type {refused[1]} "
                             "(loading it could run code from the file)") from err
        raise ValueError(f"checkpoint file {file} is truncated or corrupt ({_detail(err)})") from err
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # their messages name the file and say what is wrong
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        # a truncated zip fails to map (EINVAL); a text file read as a legacy pickle, on its first byte (KeyError)
        raise ValueError(f"checkpoint file {file} is truncated or corrupt ({_detail(err)})") from err


def _detail(err: Exception) -> str:
    """The line of torch's message that says what is wrong (its advice and boilerplate dropped)."""
    text = str(err)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    return lines[0].split(". This is an internal miniz error")[0] if lines else type(err).__name__

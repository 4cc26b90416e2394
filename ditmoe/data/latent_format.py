"""Latent shard format: WebDataset tars of fixed-size records, plus a manifest.

A dataset directory holds shards ``*.tar`` and ``manifest.json``. Each sample is two tar members:

* ``KEY.cls``: the class label as ASCII digits;
* ``KEY.latent.npy``: float16 array ``(V, 2, C, H, W)``; view ``v`` is the image (0) or its
  horizontal flip (1, present when the manifest says ``"flip": true``); then the posterior mean
  and std of the autoencoder.

Shards are plain USTAR tars, so ``webdataset.WebDataset`` reads them. Every record of a dataset has
the same size (``record_bytes`` in the manifest), so sample ``i`` of a shard starts at byte
``i * record_bytes``: the training loader reads samples in any order without an index.
"""

import hashlib
import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np

FORMAT = "ditmoe-latents"
VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
LATENT_EXT = "latent.npy"
DTYPE = "float16"
BLOCK = 512  # tar block size
MANIFEST_KEYS = (
    "format", "version", "vae", "scaling_factor", "resolution", "latent_shape", "dtype", "flip",
    "num_classes", "num_samples", "record_bytes", "shards",
)


class ManifestError(ValueError):
    """The manifest or a shard it lists is missing, malformed or does not match."""


class CorruptShardError(RuntimeError):
    """A shard holds bytes that are not a valid record of this dataset."""


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
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
    """float16 ``(V, 2, C, H, W)`` array -> ``.npy`` bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(latent, dtype=DTYPE), version=(1, 0))
    return buf.getvalue()


def npy_header(shape):
    """The ``.npy`` header that :func:`encode_latent` writes for latents of ``shape`` (without allocating them)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def record_size(shape):
    """Bytes per sample in a shard for latents of ``shape`` ``(V, 2, C, H, W)``."""
    npy = len(npy_header(shape)) + 2 * math.prod(shape)
    return 3 * BLOCK + -(-npy // BLOCK) * BLOCK  # cls header + data block, npy header + data


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

    Use as a context manager; an exception inside the block removes the temporary file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0
        self.shape = self.record_bytes = None

    def write(self, key, latent, label):
        """Append one sample: ``latent`` float16 ``(V, 2, C, H, W)``, ``label`` int >= 0."""
        try:
            check_key(key)
        except ValueError as e:
            raise ValueError(f"{self.path.name}: {e}") from None
        label = int(label)
        if label < 0:
            raise ValueError(f"{self.path.name}: key {key!r}: negative class label {label}")
        if self.shape is None:
            self.shape, self.record_bytes = np.shape(latent), record_size(np.shape(latent))
        if np.shape(latent) != self.shape:
            raise ValueError(f"{self.path.name}: key {key!r}: latent shape {np.shape(latent)} differs from "
                             f"{self.shape} of earlier samples")
        start = self._tar.offset
        self._tar.addfile(*_member(f"{key}.cls", str(label).encode()))
        self._tar.addfile(*_member(f"{key}.{LATENT_EXT}", encode_latent(latent)))
        assert self._tar.offset - start == self.record_bytes, "records must be fixed-size"
        self.num_samples += 1

    def close(self):
        """Finish the tar, rename it into place; return its manifest entry."""
        self._tar.close()
        os.replace(self._tmp, self.path)
        return {
            "name": self.path.name,
            "num_samples": self.num_samples,
            "bytes": self.path.stat().st_size,
            "sha256": sha256_file(self.path),
        }

    def abort(self):
        self._tar.close()
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
    """Parse records holding latents of ``shape`` ``(V, 2, C, H, W)``, checking their framing.

    Calling it on one record's bytes returns ``(key, label, latent)``; anything unexpected raises
    :class:`CorruptShardError` naming the shard, the sample index and (when readable) the key.
    """

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.count = math.prod(self.shape)
        self.npy_header = npy_header(self.shape)
        self.npy_size = len(self.npy_header) + 2 * self.count
        self.size = record_size(self.shape)

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
            name, size = _tar_header(buf, 2 * BLOCK)
            if name != f"{key}.{LATENT_EXT}" or size != self.npy_size:
                raise ValueError(f"expected {key}.{LATENT_EXT} of {self.npy_size} bytes, found {name!r} of {size}")
            start = 3 * BLOCK + len(self.npy_header)
            if buf[3 * BLOCK:start] != self.npy_header:
                raise ValueError(f"latent is not a {DTYPE} array of shape {list(self.shape)}")
            latent = np.frombuffer(buf, dtype=DTYPE, count=self.count, offset=start).reshape(self.shape)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptShardError(f"corrupt latent shard {shard}: sample #{index} (key {key!r}): {e}") from None
        return key, label, latent


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
    if manifest["format"] != FORMAT or manifest["version"] != VERSION:
        raise ManifestError(
            f"{path}: format {manifest['format']!r} v{manifest['version']}, expected {FORMAT!r} v{VERSION}"
        )
    for i, s in enumerate(manifest["shards"]):
        _check_object(path, f"shards[{i}]", s, SHARD_TYPES, SHARD_TYPES)
        if Path(s["name"]).name != s["name"]:
            raise ManifestError(f"{path}: shard name {s['name']!r} must be a file name in {root}")
    shape = (2 if manifest["flip"] else 1, 2, *manifest["latent_shape"])
    if manifest["record_bytes"] != record_size(shape):
        raise ManifestError(f"{path}: record_bytes {manifest['record_bytes']} does not fit latents {list(shape)}")
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
                  **extra):
    """Assemble a manifest dict from shard entries (as returned by :meth:`ShardWriter.close`)."""
    num_samples = sum(s["num_samples"] for s in shards)
    return {
        "format": FORMAT, "version": VERSION, "vae": vae, "scaling_factor": float(scaling_factor),
        "resolution": resolution, "latent_shape": [int(d) for d in latent_shape], "dtype": DTYPE,
        "flip": bool(flip), "num_classes": int(num_classes), "num_samples": num_samples,
        "record_bytes": record_size((2 if flip else 1, 2, *latent_shape)),
        "counts": counts or {"read": num_samples, "written": num_samples, "rejected": 0},
        "shards": list(shards), **extra,
    }


def write_latent_dataset(out_dir, mean, std, labels, *, mean_flip=None, std_flip=None, scaling_factor=1.0,
                         vae="identity", resolution=None, samples_per_shard=1024, num_classes=None):
    """Write in-memory latents as a latent dataset readable by ``LatentLoader``; return the manifest.

    ``mean`` is ``(N, C, H, W)``; ``std`` broadcasts to it (e.g. ``0`` for an identity autoencoder);
    ``labels`` is ``(N,)`` ints. Pass ``mean_flip``/``std_flip`` (the posterior of each flipped
    image) to let the loader flip samples; without them the dataset has no flip and none is drawn.
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
                w.write(f"{i:09d}", stacked[i], labels[i])
            shards.append(w.close())
    manifest = make_manifest(
        shards, latent_shape=mean.shape[1:], flip=mean_flip is not None,
        num_classes=num_classes if num_classes is not None else int(labels.max(initial=-1)) + 1,
        vae=vae, scaling_factor=scaling_factor, resolution=resolution,
    )
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest

"""Training loader over latent shards: exact, resumable, and the same for any worker count.

Order: epoch ``e`` shuffles all ``N`` sample indices with a permutation drawn from ``(seed, e)``.
Rank ``r`` of ``W`` takes entries ``r, r + W, r + 2W, ...`` of it, cut to ``N // W``, in batches of
``B``; the last partial batch is dropped. So within an epoch no sample is drawn twice across
ranks, every rank yields the same number of batches, and the few left-over samples (at most
``W * B - 1``) are different ones each epoch. Epochs follow each other without end.

Randomness: a sample's flip and noise ε come from a generator seeded by (seed, epoch, sample
index) only, so they do not depend on ranks, workers, batch size or where a run was resumed.
The latent is ``(mean + std * ε) * scaling_factor`` of the chosen view.

Workers: batch ``t`` (counted across epochs) is built by worker ``t mod num_workers``, and torch's
``DataLoader`` hands out worker results in turn, so batches come in the same order for any
``num_workers``. Samples are read by offset (fixed-size records, see ``latent_format``).

Pinning: with CUDA available, batches come in pinned (page-locked) host memory, so the trainer's
copies to the GPU with ``non_blocking=True`` do not wait for the device.

Captions: a dataset with captions (see ``latent_format``) gives ``(x, Caption)`` batches instead of
``(x, labels)``: the stored float16 token embeddings as float32 ``(B, L, D)`` and the mask
``arange(L) < length`` ``(B, L)`` bool. The order and the noise are the same as without captions.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..model.conditioning import Caption
from .latent_format import RecordReader, check_shard_records, manifest_text_shape, read_manifest, verify_shards


def _pinned(batch):
    x, y = batch
    y = Caption(y.tokens.pin_memory(), y.mask.pin_memory()) if isinstance(y, Caption) else y.pin_memory()
    return x.pin_memory(), y


def _sample_seed(seed, epoch, index):
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Batches(IterableDataset):
    """Infinite stream of batches ``start, start + 1, ...`` (this worker's share of it)."""

    def __init__(self, root, manifest, batch_size, seed, rank, world_size):
        self.paths = [str(Path(root) / s["name"]) for s in manifest["shards"]]
        self.starts = np.cumsum([0] + [s["num_samples"] for s in manifest["shards"]])
        c, h, w = manifest["latent_shape"]
        self.shape = (2 if manifest["flip"] else 1, 2, c, h, w)  # (V, mean/std, C, H, W)
        self.text_shape = manifest_text_shape(manifest)  # (L, D), or None without captions
        classes = manifest["num_classes"] if self.text_shape is None else None  # captioned data: labels index prompts
        self.parse = RecordReader(self.shape, self.text_shape, classes)
        self.scaling_factor = float(manifest["scaling_factor"])
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.per_rank = manifest["num_samples"] // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        self.start = 0
        self._files, self._order = {}, (None, None)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_order": (None, None)}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        t = self.start + worker
        while True:
            yield self.batch(t)
            t += num_workers

    def rank_order(self, epoch):
        """Global sample indices this rank reads in ``epoch``: ``(N // world_size,)``."""
        if self._order[0] != epoch:
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(int(self.starts[-1]))
            self._order = (epoch, perm[self.rank::self.world_size][: self.per_rank])
        return self._order[1]

    def read(self, index):
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = index - int(self.starts[shard])
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.paths[shard], "rb", buffering=0)
        buf = os.pread(f.fileno(), self.parse.size, local * self.parse.size)
        return self.parse(buf, shard=self.paths[shard], index=local)

    def batch(self, t):
        epoch, j = divmod(t, self.batches_per_epoch)
        indices = self.rank_order(epoch)[j * self.batch_size:(j + 1) * self.batch_size].tolist()
        chosen = np.empty((len(indices), *self.shape[1:]), dtype=np.float16)  # (B, 2, C, H, W)
        labels = np.empty(len(indices), dtype=np.int64)
        eps = torch.empty(len(indices), *self.shape[2:])  # (B, C, H, W)
        if self.text_shape is not None:
            tokens = np.empty((len(indices), *self.text_shape), dtype=np.float16)  # (B, L, D)
            lengths = np.empty(len(indices), dtype=np.int64)
        gen = torch.Generator()
        for k, index in enumerate(indices):
            _, labels[k], latent, *caption = self.read(index)
            if caption:
                tokens[k], lengths[k] = caption
            gen.manual_seed(_sample_seed(self.seed, epoch, index))
            flip = int(torch.randint(2, (), generator=gen))  # drawn even without flips: same eps either way
            chosen[k] = latent[flip if self.shape[0] == 2 else 0]
            torch.randn(self.shape[2:], generator=gen, out=eps[k])
        chosen = torch.from_numpy(chosen).float()
        x = (chosen[:, 0] + chosen[:, 1] * eps) * self.scaling_factor
        if self.text_shape is None:
            return x, torch.from_numpy(labels)
        mask = torch.arange(self.text_shape[0]) < torch.from_numpy(lengths)[:, None]
        return x, Caption(torch.from_numpy(tokens).float(), mask)


class LatentLoader:
    """Infinite iterator of ``(x (B, C, H, W) float32, y (B,) int64)`` over a latent dataset, or of
    ``(x, Caption(tokens (B, L, D) float32, mask (B, L) bool))`` over a dataset with captions
    (``has_captions``; ``text_len`` L and ``text_dim`` D).

    The manifest is checked at start: every shard must exist with its recorded size, hold exactly its
    ``num_samples`` records of ``record_bytes`` (see ``check_shard_records``), and with
    ``verify="sha256"`` this rank also checks the checksums of shards ``rank::world_size`` (so the
    ranks share the work; any bad shard stops the job with an error naming it). Use
    ``verify="size"`` to skip checksums. Iterate one loop at a time; ``state_dict`` gives the
    position after the last batch handed out. ``pin_memory`` (default: whether CUDA is available)
    hands out batches in pinned memory.
    """

    def __init__(self, root, batch_size, *, seed, rank=0, world_size=1, num_workers=0, verify="sha256",
                 pin_memory=None):
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
        manifest = read_manifest(root)
        verify_shards(root, manifest["shards"], checksum=False)
        check_shard_records(root, manifest)
        if verify == "sha256":
            verify_shards(root, manifest["shards"][rank::world_size], checksum=True)
        self.manifest = manifest
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._data = _Batches(root, manifest, batch_size, seed, rank, world_size)
        if self._data.batches_per_epoch == 0:
            raise ValueError(
                f"{root}: {manifest['num_samples']} samples is fewer than world_size * batch_size "
                f"= {world_size} * {batch_size}"
            )
        self._next = 0  # batches handed out so far, over all epochs

    @property
    def latent_shape(self):
        return tuple(self.manifest["latent_shape"])

    @property
    def num_classes(self):
        return self.manifest["num_classes"]

    @property
    def num_samples(self):
        return self.manifest["num_samples"]

    @property
    def has_captions(self):
        """Whether batches carry a ``Caption`` (else class labels)."""
        return self._data.text_shape is not None

    @property
    def text_len(self):
        """Tokens per caption L (the text encoder's max length), or None without captions."""
        return None if self._data.text_shape is None else self._data.text_shape[0]

    @property
    def text_dim(self):
        """Width D of the caption embeddings, or None without captions."""
        return None if self._data.text_shape is None else self._data.text_shape[1]

    @property
    def text_encoder(self):
        """The text encoder's name or path recorded in the manifest, or None without captions."""
        return self.manifest.get("text_encoder") if self.has_captions else None

    @property
    def scaling_factor(self):
        return self._data.scaling_factor

    @property
    def batches_per_epoch(self):
        return self._data.batches_per_epoch

    def __iter__(self):
        self._data.start = self._next
        if self.num_workers == 0:
            batches = map(_pinned, self._data) if self.pin_memory else iter(self._data)
        else:  # the DataLoader pins in a thread of this process
            batches = iter(DataLoader(self._data, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory))
        for batch in batches:
            self._next += 1
            yield batch

    def _fingerprint(self):
        d = self._data
        return {"seed": d.seed, "global_batch_size": d.batch_size * d.world_size, "num_samples": self.num_samples}

    def state_dict(self):
        """JSON-serialisable position: the next batch is ``batch_in_epoch`` of ``epoch``."""
        epoch, j = divmod(self._next, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": j, "samples_consumed_in_epoch": j * self._data.batch_size,
                **self._fingerprint()}

    def load_state_dict(self, state):
        """Resume at ``state``; it must come from a loader with the same seed, global batch size
        (batch size × world size) and dataset size (else the order would differ). The world size
        may differ: rank r reads entries r::W of each global batch."""
        if "global_batch_size" not in state:  # written before the world size could change
            state = {**state, "global_batch_size": state["batch_size"] * state["world_size"]}
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader {value!r}: "
                                 f"cannot resume exactly")
        self._next = int(state["epoch"]) * self.batches_per_epoch + int(state["batch_in_epoch"])


def read_fixed_samples(root, count: int, *, seed: int):
    """A fixed evaluation set of latent dataset ``root``: ``count`` samples spread evenly over it (all when it holds
    fewer), in index order, unflipped, each latent drawn with noise from (seed, index) alone.
    Returns ``(x (n, C, H, W), y, labels (n,))``: ``y`` the labels, or a ``Caption`` for captioned data."""
    manifest = read_manifest(root)
    verify_shards(root, manifest["shards"], checksum=True)
    check_shard_records(root, manifest)
    data = _Batches(root, manifest, 1, seed, 0, 1)
    total = manifest["num_samples"]
    indices = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64)).tolist()
    x, labels, tokens, lengths = [], [], [], []
    gen = torch.Generator()
    for index in indices:
        _, label, latent, *caption = data.read(index)
        gen.manual_seed(_sample_seed(seed, "fixed", index))
        mean, std = torch.from_numpy(latent[0].astype(np.float32))  # view 0: unflipped
        x.append((mean + std * torch.randn(mean.shape, generator=gen)) * data.scaling_factor)
        labels.append(int(label))
        if caption:
            tokens.append(torch.from_numpy(caption[0].astype(np.float32)))
            lengths.append(int(caption[1]))
    labels = torch.tensor(labels, dtype=torch.int64)
    if not tokens:
        return torch.stack(x), labels, labels
    mask = torch.arange(data.text_shape[0]) < torch.tensor(lengths)[:, None]
    return torch.stack(x), Caption(torch.stack(tokens), mask), labels

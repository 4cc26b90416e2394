"""Precompute VAE latents from WebDataset image shards (the engine of tools/precompute_latents.py).

Each input shard becomes one latent shard of the same file name in the output directory. Input
shard ``i`` goes to rank ``i % world_size``. A finished shard gets a sidecar ``NAME.tar.json``
(counts, checksum, rejects, the input's size and modification time), written after the tar is renamed
into place; a rerun skips shards whose sidecar matches the settings and whose input is unchanged. The
last rank to finish writes ``rejects.jsonl`` and then ``manifest.json``. Every sample read is either
written or listed in the rejects with its reason.

Captions: with a text encoder (``Settings.text_encoder``), each sample's caption (its ``txt`` member, or
key ``caption_key`` of its ``json`` member) is embedded by the frozen encoder, padded or truncated to
``text_max_length`` tokens, and stored with the latents (see ``latent_format``). A sample without a
caption, or with an empty one, is rejected. ``cls`` is then optional: a sample without one gets label
0 (a label that is present must still be valid).

Samples are rejected, never repaired: a duplicate key, a label outside ``[0, num_classes)``, and a
key that is not a plain relative path (absolute, with ``.``/``..``/empty parts or a backslash: as an
output member name it would point out of the dataset when extracted). A shard's temporary files
(``NAME.tar.tmpPID``, ``NAME.tar.json.tmpPID``) are removed when its writing fails, and stale ones
from killed runs when the rank that owns the shard starts. A full disk stops the run with one error naming
the file (``no space left on MOUNT writing OUT/NAME.tar``); the shards finished before stay, and a rerun
skips them.
"""

import glob
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..write_errors import writing
from .image_shards import ImageShardReader
from .latent_format import MANIFEST, REJECTS, ShardWriter, check_key, make_manifest, write_json_atomic
from .preprocess import error_text, pil_preprocess, plan_resize, probe_image
from .vae_encode import encode_with_flip, latent_shape, load_vae

IMAGE_EXTS = ("jpg", "jpeg", "png")
DEFAULT_LABEL_LIMIT = 1000  # without num_classes, labels at or above this are rejected


@dataclass
class Settings:
    inputs: list  # input shard paths, in order
    output: Path
    resolution: int
    vae: str
    batch_size: int = 32
    workers: int = 4
    decoder: str = "pil"  # "pil" or "dali"
    device: str = "cpu"  # "cpu" or "cuda"
    num_classes: int = None  # labels must lie in [0, num_classes); None: largest label + 1, below 1000
    text_encoder: str = None  # text encoder (registered name, hub id or directory): store caption embeddings
    text_max_length: int = None  # tokens per caption, with text_encoder
    caption_key: str = None  # captions from this key of the json member; None: from the txt member
    text_batch_size: int = None  # captions per text encoder forward; None: batch_size

    @property
    def label_limit(self):
        """Labels at or above this are rejected."""
        return self.num_classes or DEFAULT_LABEL_LIMIT


@dataclass
class _Candidate:
    key: str
    data: bytes
    label: int
    image_format: str
    mode: str
    plan: object
    caption: str = None


def rank_from_env(env=os.environ):
    """``(rank, world_size, local_rank)`` from torchrun (RANK/WORLD_SIZE) or SLURM variables."""
    names = [("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")]
    for rank_var, world_var, local_var in names:
        if rank_var in env:
            try:
                rank, world, local = int(env[rank_var]), int(env.get(world_var, 1)), int(env.get(local_var, 0))
            except ValueError:
                raise ValueError(f"{rank_var}/{world_var}/{local_var} must be integers") from None
            if not 0 <= rank < world:
                raise ValueError(f"{rank_var}={rank} is out of range for {world_var}={world}")
            return rank, world, local
    return 0, 1, 0


def _key_problem(key):
    """Why ``key`` cannot name output members (str), or None if it can."""
    try:
        check_key(key)
    except ValueError as e:
        return str(e)
    if key.startswith("/"):
        return "unsafe key: absolute path"
    if "\\" in key:
        return "unsafe key: backslash (a path separator on Windows)"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "unsafe key: empty, '.' or '..' path component"
    return None


def _label(fields, limit):
    """The class label in ``fields["cls"]`` (int), or the reason to reject the sample (str)."""
    if "cls" not in fields:
        return "missing cls"
    try:
        label = int(fields["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return f"bad cls {fields['cls'][:20]!r}"
    if not 0 <= label < limit:
        return f"cls {label} is outside [0, {limit}): see --num-classes"
    return label


def _caption(fields, key):
    """The caption in ``fields["txt"]`` (``key`` None) or in key ``key`` of ``fields["json"]``, or the reason to
    reject the sample (``(reason,)``, a 1-tuple, as a caption is a str too)."""
    if key is None:
        if "txt" not in fields:
            return ("missing txt caption",)
        try:
            caption = fields["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return ("txt caption is not UTF-8",)
    else:
        if "json" not in fields:
            return (f"missing json (captions come from its key {key!r})",)
        try:
            meta = json.loads(fields["json"])
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return (f"bad json: {str(e).splitlines()[0] if str(e) else type(e).__name__}",)
        if not isinstance(meta, dict) or key not in meta:
            return (f"json has no key {key!r}",)
        caption = meta[key]
        if not isinstance(caption, str):
            return (f"json key {key!r} is not a string but {type(caption).__name__}",)
    caption = caption.strip()
    return caption if caption else ("empty caption",)


def _caption_source(key):
    """Where captions come from, as the manifest records it: ``"txt"`` or ``"json:KEY"``."""
    return "txt" if key is None else f"json:{key}"


def _prepare(sample, settings, seen):
    """TarSample -> _Candidate, or the reason to reject it (str)."""
    if sample.error:
        return sample.error
    if sample.key in seen:
        return "duplicate key in this shard"
    seen.add(sample.key)
    problem = _key_problem(sample.key)
    if problem:
        return problem
    captions = settings.text_encoder is not None
    caption = None
    if captions and "cls" not in sample.fields:
        label = 0  # text datasets need no class labels
    else:
        label = _label(sample.fields, settings.label_limit)
        if isinstance(label, str):
            return label
    if captions:
        caption = _caption(sample.fields, settings.caption_key)
        if isinstance(caption, tuple):
            return caption[0]
    ext = next((e for e in IMAGE_EXTS if e in sample.fields), None)
    if ext is None:
        return f"no jpg/jpeg/png image (fields: {sorted(sample.fields)})"
    try:
        image_format, mode, size = probe_image(sample.fields[ext])
    except Exception as e:  # PIL raises many types for bad headers
        return f"undecodable {ext}: {error_text(e)}"
    plan = plan_resize(*size, settings.resolution)
    return _Candidate(sample.key, sample.fields[ext], label, image_format, mode, plan, caption)


class _Preprocessor:
    """Candidates -> uint8 ``(res, res, 3)`` tensors on the VAE device, or a reject reason (str) each."""

    def __init__(self, settings, gpu):
        self.resolution = settings.resolution
        self.device = torch.device(f"cuda:{gpu}" if settings.device == "cuda" else "cpu")  # where images go
        self.pool = ThreadPoolExecutor(max(1, settings.workers))
        self.dali = None
        self.counts = {"dali": 0, "pil": 0}
        if settings.decoder == "dali":
            try:
                from .dali_preprocess import DaliPreprocessor
            except ImportError as e:
                raise ImportError(f"--decoder dali needs NVIDIA DALI (pip install nvidia-dali-cuda130): {e}") from None
            on_gpu = settings.device == "cuda"
            self.dali = DaliPreprocessor(settings.resolution, settings.batch_size, num_threads=max(1, settings.workers),
                                         device="gpu" if on_gpu else "cpu", device_id=gpu if on_gpu else None)

    def _pil(self, cand):
        try:
            return torch.from_numpy(pil_preprocess(cand.data, self.resolution))
        except Exception as e:  # any decoder failure rejects this one sample
            return f"undecodable {cand.image_format}: {error_text(e)}"

    def __call__(self, cands):
        results = [None] * len(cands)
        on_dali = [i for i, c in enumerate(cands) if self.dali and self.dali.supports(c.image_format, c.mode, c.plan)]
        if on_dali:
            try:
                images = self.dali([cands[i].data for i in on_dali], [cands[i].plan for i in on_dali])
                for i, image in zip(on_dali, images):
                    results[i] = image
                self.counts["dali"] += len(on_dali)
            except Exception:  # DALI raises several types; one bad image fails the whole batch,
                pass  # so its samples are redone one by one with PIL below
        rest = [i for i in range(len(cands)) if results[i] is None]
        for i, result in zip(rest, self.pool.map(self._pil, [cands[i] for i in rest])):
            is_image = not isinstance(result, str)
            results[i] = result.to(self.device) if is_image else result
            self.counts["pil"] += is_image
        return results


def _batched(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _source_stat(src) -> dict:
    """What identifies the content of input shard ``src`` cheaply: its size and modification time."""
    stat = Path(src).stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _temp_path(path):
    """Where latent_format's writers (and ``finalize``) put ``path`` until it is complete."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _remove_temp_files(*paths):
    """Delete ``PATH.tmpPID`` of each path, for any PID (a partial file from this or a killed run)."""
    for path in paths:
        pattern = re.compile(re.escape(path.name) + r"\.tmp\d+")
        for tmp in path.parent.glob(glob.escape(path.name) + ".tmp*"):
            if pattern.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)


class Precompute:
    """One rank's work: load the VAE once, then :meth:`run`."""

    def __init__(self, settings, rank=0, world_size=1, local_rank=0):
        if settings.decoder not in ("dali", "pil") or settings.device not in ("cpu", "cuda"):
            raise ValueError(f"bad decoder/device {settings.decoder!r}/{settings.device!r}")
        names = [Path(p).name for p in settings.inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input shards must have distinct file names (they name the outputs): {dupes[:5]}")
        self.s, self.rank, self.world_size = settings, rank, world_size
        gpu = local_rank % max(torch.cuda.device_count(), 1)  # srun may show each task only its own GPU
        if (settings.text_encoder is None) != (settings.text_max_length is None):
            raise ValueError("a text encoder needs text_max_length, and text_max_length a text encoder")
        if settings.caption_key is not None and settings.text_encoder is None:
            raise ValueError("caption_key needs a text encoder")
        device = f"cuda:{gpu}" if settings.device == "cuda" else "cpu"
        self.vae = load_vae(settings.vae, device)
        self.fingerprint = {
            "vae": settings.vae, "resolution": settings.resolution,
            "scaling_factor": float(self.vae.config.scaling_factor),
            "latent_shape": list(latent_shape(self.vae, settings.resolution)), "flip": True,
            "label_limit": settings.label_limit,
        }
        self.text = None
        if settings.text_encoder is not None:  # fingerprint keys only with captions: older sidecars still match
            from ..text import TextEncoder

            self.text = TextEncoder.load(settings.text_encoder, settings.text_max_length, device)
            self.fingerprint.update(text_encoder=settings.text_encoder, text_max_length=settings.text_max_length,
                                    text_dim=self.text.width, caption_key=settings.caption_key)
        self.pre = _Preprocessor(settings, gpu)

    def _paths(self, src):
        dst = self.s.output / (Path(src).stem + ".tar")
        return dst, dst.with_name(dst.name + ".json")

    def _finished(self, src):
        """The sidecar of a completed output shard for ``src``, or None if it must be (re)done."""
        dst, side = self._paths(src)
        try:
            part = json.loads(side.read_text())
        except FileNotFoundError:
            return None
        if part["settings"] != self.fingerprint:
            raise ValueError(f"{side} was written with {part['settings']}, not {self.fingerprint}: "
                             f"use another --out")
        if part["source"] != str(Path(src).resolve()):
            raise ValueError(f"{side} belongs to input {part['source']}, not {Path(src).resolve()}")
        if not dst.is_file() or dst.stat().st_size != part["bytes"]:
            return None
        if part.get("source_stat") != _source_stat(src):
            tqdm.write(f"{src} changed since {dst.name} was written from it (size or modification time): redoing it",
                       file=sys.stderr)
            return None
        return part

    def _process(self, src, bar):
        """Encode ``src`` into its latent shard and sidecar; no temporary file outlives a failure."""
        dst, side = self._paths(src)
        side.unlink(missing_ok=True)  # a stale sidecar must not count as done while we redo the shard
        try:
            part = self._encode_shard(src, dst, bar)
            write_json_atomic(side, part)
        finally:
            _remove_temp_files(dst, side)  # only this rank writes them
        if part["tar_error"]:
            tqdm.write(f"warning: {src}: {part['tar_error']}", file=sys.stderr)
        return part

    def _encode_shard(self, src, dst, bar):
        """Write the latent shard of ``src``; return its sidecar record (counts, checksum, rejects)."""
        source_stat = _source_stat(src)  # before reading: a shard replaced meanwhile is redone next time
        reader = ImageShardReader(src)
        read, rejects, labels, seen = 0, [], [], set()
        with ShardWriter(dst) as writer:
            for batch in _batched(reader, self.s.batch_size):
                read += len(batch)
                for sample, result in zip(batch, self._encode_batch(batch, seen)):
                    if isinstance(result, str):
                        rejects.append({"shard": str(src), "key": sample.key, "reason": result})
                    else:
                        cand, latent, *caption = result
                        writer.write(cand.key, latent, cand.label, *caption)
                        labels.append(cand.label)
                bar.update(len(batch))
            info = writer.close()
        assert info["num_samples"] + len(rejects) == read
        return {**info, "source": str(Path(src).resolve()), "source_stat": source_stat, "read": read,
                "rejected": len(rejects),
                "rejects": rejects, "tar_error": reader.error, "max_label": max(labels, default=-1),
                "settings": self.fingerprint}

    def _encode_batch(self, batch, seen):
        """TarSamples -> ``(candidate, latent)`` or the reason to reject it (str), one each, in order."""
        results = [_prepare(sample, self.s, seen) for sample in batch]
        todo = [i for i, r in enumerate(results) if not isinstance(r, str)]
        images = dict(zip(todo, self.pre([results[i] for i in todo])))  # index -> (res, res, 3) uint8 or reason
        good = [i for i in todo if not isinstance(images[i], str)]
        if good:
            latents = encode_with_flip(self.vae, torch.stack([images[i] for i in good]))  # (N, 2, 2, C, h, w)
            captions = self._encode_captions([results[i].caption for i in good]) if self.text else None
            for k, (i, latent) in enumerate(zip(good, latents)):
                results[i] = (results[i], latent.numpy())
                if captions is not None:
                    tokens, length = captions[0][k], int(captions[1][k])
                    finite = np.isfinite(tokens[:length]).all()
                    results[i] = results[i] + (tokens, length) if finite else \
                        f"caption embeddings are not finite in float16 (text encoder {self.s.text_encoder!r})"
        for i in set(todo) - set(good):
            results[i] = images[i]
        return results

    def _encode_captions(self, captions):
        """Captions -> ``(tokens (N, L, D) float16 numpy, lengths (N,) int64 numpy)``."""
        caption = self.text.encode(captions, batch_size=self.s.text_batch_size or self.s.batch_size)
        return caption.tokens.cpu().to(torch.float16).numpy(), caption.mask.sum(1).cpu().numpy()

    def run(self):
        """Process this rank's shards; write the manifest if all shards are done. Returns totals."""
        self.s.output.mkdir(parents=True, exist_ok=True)
        mine = self.s.inputs[self.rank::self.world_size]
        _remove_temp_files(*(path for src in mine for path in self._paths(src)))  # left by killed runs
        totals = {"shards": len(mine), "skipped": 0, "read": 0, "written": 0, "rejected": 0}
        start = time.perf_counter()
        with tqdm(unit="img", desc=f"rank {self.rank}/{self.world_size}", mininterval=2) as bar:
            for src in mine:
                bar.set_postfix_str(Path(src).name)
                part = self._finished(src)
                if part is not None:
                    totals["skipped"] += 1
                    continue
                part = self._process(src, bar)
                totals["read"] += part["read"]
                totals["written"] += part["num_samples"]
                totals["rejected"] += part["rejected"]
        totals["seconds"] = time.perf_counter() - start
        totals["decoded_by"] = dict(self.pre.counts)
        totals["manifest"] = self.finalize()
        return totals

    def finalize(self):
        """Write rejects + manifest if every input shard has a sidecar; return the manifest or None."""
        parts = [self._finished(src) for src in self.s.inputs]
        if None in parts:
            return None
        rejects, manifest = self.s.output / REJECTS, self.s.output / MANIFEST
        try:  # other ranks may be finalizing too: remove only this process's temporary files
            self._write_rejects(parts, rejects)
            result = self._manifest(parts)
            write_json_atomic(manifest, result)
        finally:
            _temp_path(rejects).unlink(missing_ok=True)
            _temp_path(manifest).unlink(missing_ok=True)
        return result

    @staticmethod
    def _write_rejects(parts, path):
        """All shards' rejects, one JSON object a line, in input order."""
        with writing(path), open(_temp_path(path), "w") as f:
            for part in parts:
                for reject in part["rejects"]:
                    f.write(json.dumps(reject) + "\n")
        os.replace(f.name, path)

    def _manifest(self, parts):
        """The manifest of the finished shards' sidecars ``parts``."""
        keep = ("name", "num_samples", "bytes", "sha256", "source", "read", "rejected", "tar_error")
        counts = {"read": sum(p["read"] for p in parts), "written": sum(p["num_samples"] for p in parts),
                  "rejected": sum(p["rejected"] for p in parts)}
        fp = self.fingerprint
        text = {} if self.text is None else {
            "text_encoder": fp["text_encoder"], "text_max_length": fp["text_max_length"], "text_dim": fp["text_dim"],
            "caption_source": _caption_source(fp["caption_key"])}
        return make_manifest(
            [{k: p[k] for k in keep} for p in parts], latent_shape=fp["latent_shape"], flip=True,
            num_classes=self.s.num_classes or max(p["max_label"] for p in parts) + 1, vae=fp["vae"],
            scaling_factor=fp["scaling_factor"], resolution=fp["resolution"], counts=counts, rejects=REJECTS,
            source_shards=[p["source"] for p in parts], **text,
        )


def summary_lines(totals: dict, rank: int, world_size: int, out: Path) -> list[str]:
    """What a finished rank reports: its counts and, from the last rank to finish, the dataset's."""
    rate = totals["read"] / max(totals["seconds"], 1e-9)
    lines = [f"rank {rank}/{world_size}: {totals['shards']} shards ({totals['skipped']} already done), "
             f"read {totals['read']} = written {totals['written']} + rejected {totals['rejected']}, "
             f"{totals['seconds']:.1f} s, {rate:.1f} img/s, decoded by {totals['decoded_by']}"]
    manifest = totals["manifest"]
    if manifest is None:
        return lines + ["other ranks still running: the last one to finish writes the manifest (rerun to retry)"]
    c = manifest["counts"]
    lines.append(f"dataset complete: {manifest['num_samples']} samples in {len(manifest['shards'])} shards; "
                 f"read {c['read']} = written {c['written']} + rejected {c['rejected']}; "
                 f"{out / 'manifest.json'}, rejects in {out / 'rejects.jsonl'}")
    return lines + [f"warning: {shard['source']}: {shard['tar_error']}" for shard in manifest["shards"]
                    if shard["tar_error"]]

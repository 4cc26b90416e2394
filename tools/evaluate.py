"""Inception Score, FID, sFID, precision and recall of ADM-format samples against an ADM reference batch.

    python tools/evaluate.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--out metrics.json]
    python tools/evaluate.py --samples images.npz --write-ref my_ref.npz --inception-weights ...

Computes the metrics as guided-diffusion's evaluations/evaluator.py does, with a PyTorch port of its
Inception graph that loads pytorch-fid's FID Inception weights from --inception-weights (or
$DITMOE_INCEPTION_WEIGHTS). ``arr_0`` holds (N, H, W, 3) uint8 images; grayscale (N, H, W) or
(N, H, W, 1) is repeated to 3 channels. The reference's mu, sigma, mu_s, sigma_s are used when present,
otherwise computed from its arr_0; precision and recall need its arr_0. --write-ref writes such a
reference batch (those statistics and the 3-channel arr_0) for the images of --samples.
"""

import argparse
import json
import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.eval.adm_metrics import inception_score, precision_recall  # noqa: E402
from ditmoe.eval.frechet import feature_statistics, frechet_distance  # noqa: E402
from ditmoe.eval.inception import InceptionV3, load_inception  # noqa: E402

WEIGHTS_ENV = "DITMOE_INCEPTION_WEIGHTS"
MIN_IMAGES = 4  # precision/recall use the 3rd nearest neighbour
STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="npz with arr_0 (N, H, W, 3) uint8 images")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ref", help="ADM reference batch npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    target.add_argument("--write-ref", help="write an ADM reference batch npz for the --samples images")
    p.add_argument("--inception-weights", help=f"FID Inception state dict (default: ${WEIGHTS_ENV})")
    p.add_argument("--out", help="also write the metrics as JSON (with --ref)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def npz_keys(path: str) -> list[str]:
    """Names of the arrays in the npz at PATH, after checking that it is one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file")
    with zipfile.ZipFile(path) as archive:
        return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]


@contextmanager
def _images_member(path: str):
    """(open arr_0.npy member positioned after its header, its shape), after checking the images."""
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise ValueError(f"{path}: no arr_0 array (it has {', '.join(keys) or 'none'})")
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{path}: arr_0 has unsupported .npy format version {version}")
        shape, fortran_order, dtype = read_header[version](member)
        if dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 must hold uint8 images, got {dtype}")
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))) or 0 in shape[1:]:
            raise ValueError(f"{path}: arr_0 must be (N, H, W, 3) images or grayscale (N, H, W[, 1]), "
                             f"got shape {shape}")
        if shape[0] < MIN_IMAGES:
            raise ValueError(f"{path}: the metrics need at least {MIN_IMAGES} images (k=3 nearest "
                             f"neighbours), got {shape[0]}")
        if fortran_order:
            raise ValueError(f"{path}: arr_0 is stored in Fortran order; save a C-ordered array")
        yield member, shape


def image_shape(path: str) -> tuple[int, ...]:
    """Shape of arr_0 after checking it holds enough uint8 images."""
    with _images_member(path) as (_, shape):
        return shape


def image_batches(path: str, batch_size: int):
    """Yield (n, H, W, 3) uint8 batches of arr_0, streamed (reference batches reach tens of GB)."""
    with _images_member(path) as (member, shape):
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = member.read(count * per_image)
            if len(data) != count * per_image:
                raise ValueError(f"{path}: arr_0 is truncated")
            batch = np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *shape[1:3], -1)
            yield np.repeat(batch, 3, axis=3) if batch.shape[3] == 1 else batch


@torch.no_grad()
def inception_outputs(model: InceptionV3, path: str, batch_size: int, device) -> dict[str, np.ndarray]:
    """pool (N, 2048), spatial (N, 2023) and probs (N, 1008) of every image in arr_0."""
    parts = {"pool": [], "spatial": [], "probs": []}
    for batch in image_batches(path, batch_size):
        out = model(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2))
        for name, chunks in parts.items():
            chunks.append(getattr(out, name).cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def statistics(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ADM's reference statistics: mean and covariance of the pool (mu, sigma) and spatial (mu_s, sigma_s) features."""
    (mu, sigma), (mu_s, sigma_s) = feature_statistics(outputs["pool"]), feature_statistics(outputs["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def stored_statistics(path: str) -> dict[str, np.ndarray] | None:
    """mu, sigma, mu_s, sigma_s of a reference batch, or None when it has none."""
    keys = npz_keys(path)
    present = [k for k in STAT_SHAPES if k in keys]
    if not present:
        return None
    missing = [k for k in STAT_SHAPES if k not in present]
    if missing:
        raise ValueError(f"{path}: has {', '.join(present)} but not {', '.join(missing)}")
    with np.load(path) as ref:
        stats = {k: ref[k] for k in STAT_SHAPES}
    for key, shape in STAT_SHAPES.items():
        if stats[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {stats[key].shape}, expected {shape}")
    return stats


def write_reference(out: str, stats: dict[str, np.ndarray], images: str, batch_size: int):
    """np.savez-compatible npz with the statistics and the 3-channel arr_0, written batch by batch."""
    count, height, width = image_shape(images)[:3]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as archive:
        for key, value in stats.items():
            with archive.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, value)
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (count, height, width, 3)}
            np.lib.format.write_array_header_2_0(f, header)
            for batch in image_batches(images, batch_size):
                f.write(batch.tobytes())


def evaluate(model: InceptionV3, args, ref_stats: dict[str, np.ndarray] | None, ref_has_images: bool) -> dict:
    """The five metrics of ADM's evaluator for --samples against --ref (None where not computable)."""
    print(f"computing activations of {args.samples}...", file=sys.stderr, flush=True)
    samples = inception_outputs(model, args.samples, args.batch_size, args.device)
    ref = None
    if ref_has_images:
        print(f"computing activations of {args.ref}...", file=sys.stderr, flush=True)
        ref = inception_outputs(model, args.ref, args.batch_size, args.device)
    ref_stats = ref_stats if ref_stats is not None else statistics(ref)
    sample_stats = statistics(samples)
    print("computing metrics...", file=sys.stderr, flush=True)
    metrics = {
        "inception_score": inception_score(samples["probs"]),
        "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"],
                                 ref_stats["mu_s"], ref_stats["sigma_s"]),
        "precision": None,
        "recall": None,
    }
    if ref is None:
        print(f"precision/recall skipped: {args.ref} has no arr_0 images", file=sys.stderr)
    else:
        metrics["precision"], metrics["recall"] = precision_recall(ref["pool"], samples["pool"], device=args.device)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    weights = args.inception_weights or os.environ.get(WEIGHTS_ENV)
    if not weights:
        sys.exit(f"error: no Inception weights: pass --inception-weights PATH or set ${WEIGHTS_ENV} "
                 "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    if args.batch_size <= 0:
        sys.exit(f"error: --batch-size must be positive, got {args.batch_size}")
    torch.backends.cudnn.allow_tf32 = False  # the TF graph runs in float32; TF32 moves features by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        image_shape(args.samples)
        if args.write_ref:
            model = load_inception(weights, args.device)
            stats = statistics(inception_outputs(model, args.samples, args.batch_size, args.device))
            write_reference(args.write_ref, stats, args.samples, args.batch_size)
            print(f"wrote reference batch {args.write_ref}")
            return
        ref_stats = stored_statistics(args.ref)
        ref_has_images = "arr_0" in npz_keys(args.ref)
        if ref_has_images:
            image_shape(args.ref)
        elif ref_stats is None:
            raise ValueError(f"{args.ref}: neither arr_0 nor mu, sigma, mu_s, sigma_s")
        model = load_inception(weights, args.device)
        metrics = evaluate(model, args, ref_stats, ref_has_images)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for label, key in [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")]:
        print(f"{label}: {'n/a' if metrics[key] is None else metrics[key]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**metrics, "samples": args.samples, "ref": args.ref}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

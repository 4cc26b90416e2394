"""Sample images from a trained checkpoint into an ADM-format npz, on one process or on many.

    python tools/sample.py --ckpt runs/demo --out samples.npz --num-samples 1000 \
        [--cfg-scale 1.5] [--sampler ddpm|ddim|dpm_solver++] [--steps 50] [--grid grid.png] [--seed 0]
    torchrun --nproc_per_node 8 tools/sample.py --ckpt runs/demo --out samples.npz --num-samples 50000 ...

Writes ``arr_0`` (N, H, W, C) uint8 images and ``arr_1`` (N,) int64 class labels (classes cycle
0..K-1). Uses EMA weights unless ``--weights model``. The models of the embedded digits demo work
directly in pixel space, so their samples are the images.

Samples come in batches of ``--batch-size``; batch b starts from noise seeded by ``--seed`` + b. Under
torchrun (or srun) each rank samples a contiguous share of the batches on ``cuda:LOCAL_RANK`` (or the CPU) into
``<out>.rank<R>-of-<W>.npy``; rank 0 streams the parts into the npz and removes them. The npz is written
under a temporary name and renamed when complete, and it is the same for any number of ranks (given the
same ``--seed``, ``--batch-size`` and kind of device). A run that dies part-way may leave parts behind;
the next run with as many ranks overwrites them.
"""

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditmoe.diffusion import build_objective  # noqa: E402
from ditmoe.eval.grid import save_grid  # noqa: E402
from ditmoe.inference import load_model  # noqa: E402
from ditmoe.parallel.distributed import init_distributed  # noqa: E402
from ditmoe.sampling import balanced_labels, generate, num_batches, rank_batches, to_uint8_images  # noqa: E402

COPY_ROWS = 256  # images per read while rank 0 copies the parts into the npz


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--sampler", help="ddpm (default for DDPM models) | ddim | dpm_solver++ | euler (rectified flow)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 250 ddpm, 50 ddim/euler, 20 dpm_solver++)")
    p.add_argument("--guide-channels", type=int, help="guide only the first N channels (DiT used 3 of 4)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--batch-size", type=int, default=250, help="samples per batch; ranks sample whole batches")
    p.add_argument("--grid", help="also write a PNG grid (one row per class, up to 10 per row)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def barrier():
    """Wait for all ranks."""
    dist.barrier()


def load_in_turn(args, rank: int, device: torch.device):
    """(model on ``device``, meta). Rank 0 loads first, so a ZeRO-3 checkpoint's universal conversion
    (``--weights model``) runs once; the other ranks load after it."""
    if rank > 0:
        barrier()
    loaded = load_model(args.ckpt, weights=args.weights, device=device)
    if rank == 0:
        barrier()
    return loaded


def part_path(out: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its images, next to ``out``."""
    return out.with_name(f"{out.name}.rank{rank:05d}-of-{world:05d}.npy")


def write_npy_header(f, shape: tuple, dtype) -> None:
    """The .npy header of a C-ordered array; its raw bytes follow."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def sample_batches(model, objective, labels: torch.Tensor, batches: range, args, progress: bool):
    """The uint8 images (n, H, W, C) of each of the global ``batches``, one batch at a time."""
    for b in batches:
        latents = generate(model, objective, labels, cfg_scale=args.cfg_scale, sampler=args.sampler,
                           steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                           guide_channels=args.guide_channels, progress=progress, batches=[b])
        yield to_uint8_images(latents).numpy()


def write_part(part: Path, images, count: int):
    """Stream ``count`` images, arriving in batches, into the .npy file ``part``. The file is created
    once the first batch is there, so a sampler that fails at once leaves no file behind."""
    first = next(images)
    with open(part, "wb") as f:
        write_npy_header(f, (count, *first.shape[1:]), np.uint8)
        f.write(first.tobytes())
        for batch in images:
            f.write(batch.tobytes())


def write_npz(out: Path, parts: list[np.ndarray], labels: np.ndarray):
    """``arr_0``: the images of ``parts`` one after another, copied a few rows at a time; ``arr_1``:
    ``labels``. Written under a temporary name and renamed, so ``out`` is either complete or untouched."""
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            write_npy_header(f, (sum(len(p) for p in parts), *parts[0].shape[1:]), np.uint8)
            for part in parts:
                for i in range(0, len(part), COPY_ROWS):
                    f.write(part[i:i + COPY_ROWS].tobytes())
        with zf.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels, allow_pickle=False)
    tmp.replace(out)


def write_grid(path: str, parts: list[np.ndarray], labels: np.ndarray, num_classes: int):
    """One row per class of its first (up to 10) samples: the first samples, as labels cycle through the classes."""
    n = min(10, len(labels) // num_classes) * num_classes
    head = []
    for part in parts:
        head.append(part[:n - sum(map(len, head))])
    head = np.concatenate(head)
    rows = [head[labels[:len(head)] == c] for c in range(num_classes)]
    save_grid(np.concatenate(rows), rows=num_classes, path=path)


def assemble(out: Path, paths: list[Path], labels: np.ndarray, grid: str | None, num_classes: int):
    """Rank 0, once every rank has written its part: the npz (and the grid) from the parts, which it then removes."""
    parts = [np.load(p, mmap_mode="r") for p in paths]
    write_npz(out, parts, labels.astype(np.int64))
    print(f"wrote {len(labels)} samples of shape {parts[0].shape[1:]} to {out}")
    if grid:
        write_grid(grid, parts, labels, num_classes)
        print(f"wrote grid {grid}")
    for p in paths:
        p.unlink()


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples <= 0:
        sys.exit(f"error: --num-samples must be positive, got {args.num_samples}")
    if args.batch_size <= 0:
        sys.exit(f"error: --batch-size must be positive, got {args.batch_size}")
    if not args.out.endswith(".npz"):
        sys.exit(f"error: --out {args.out} must end in .npz")
    out = Path(args.out)
    rank, world, device = init_distributed()
    total = num_batches(args.num_samples, args.batch_size)
    batches = rank_batches(total, rank, world)
    try:
        model, meta = load_in_turn(args, rank, device)
        objective = build_objective(meta["train_config"]["objective"])
        k = model.config.num_classes
        if args.grid and args.num_samples < k:
            sys.exit(f"error: --grid needs at least {k} samples (one per class)")
        labels = balanced_labels(args.num_samples, k)
        out.parent.mkdir(parents=True, exist_ok=True)
        if batches:  # with more ranks than batches, the last ones have none
            share = labels[batches.start * args.batch_size:batches.stop * args.batch_size]
            write_part(part_path(out, rank, world), sample_batches(model, objective, labels, batches, args,
                                                                   progress=rank == 0), len(share))
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"error: {err}")
    barrier()
    if rank == 0:
        assemble(out, [part_path(out, r, world) for r in range(world) if rank_batches(total, r, world)],
                 labels.numpy(), args.grid, k)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Precompute benchmark: DALI-vs-PIL pixel gap per size class, preprocessing and end-to-end images/s.

    python benchmarks/precompute.py [--images 48] [--vae PATH_OR_ID] [--device cpu|cuda]

Synthetic photo-like JPEGs in several size classes are written as a WebDataset shard; without
``--vae`` a tiny random AutoencoderKL is used (so the numbers measure the data path, not the VAE).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ditmoe.data.image_shards import expand_shards
from ditmoe.data.precompute import Precompute, Settings
from ditmoe.data.preprocess import pil_preprocess, plan_resize, probe_image
from ditmoe.data.synthetic import encode_image, natural_image, save_tiny_vae, write_tar

# (name, (height, width) choices): by the number of ADM box halvings at resolution 256
SIZE_CLASSES = [
    ("short < 256 (upscale)", [(200, 300), (180, 240)]),
    ("256-511 (0 halvings)", [(375, 500), (333, 500), (500, 375)]),
    ("512-1023 (1 halving)", [(600, 800), (515, 777), (768, 1024)]),
    (">= 1024 (2+ halvings)", [(1200, 1600), (1365, 2048), (2100, 2900)]),
]


def make_images(count, seed=0):
    """``[(class name, jpeg bytes)]``, ``count`` per size class."""
    rng = np.random.default_rng(seed)
    out = []
    for name, sizes in SIZE_CLASSES:
        for i in range(count):
            h, w = sizes[rng.integers(len(sizes))]
            out.append((name, encode_image(natural_image(h, w, seed * 1000 + len(out)))))
    return out


def naive_dali(resolution):
    """One-step DALI resize (bicubic, antialiased) + center crop: the baseline without emulation."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=64, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="encoded", dtype=types.UINT8)
        img = fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)
        img = fn.resize(img, resize_shorter=resolution, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop(img, crop=(resolution, resolution))

    p = pipe()
    p.build()

    def run(datas):
        p.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        (out,) = p.run()
        return [np.array(out[i]) for i in range(len(datas))]

    return run


def pixel_gap(images, resolution, device):
    from ditmoe.data.dali_preprocess import DaliPreprocessor

    dali = DaliPreprocessor(resolution, 64, num_threads=2, device=device, device_id=0 if device == "gpu" else None)
    datas = [d for _, d in images]
    plans = [plan_resize(*probe_image(d)[2], resolution) for d in datas]
    refs = [pil_preprocess(d, resolution) for d in datas]
    dali(datas[:2], plans[:2])  # build the pipeline outside the timing
    t = time.perf_counter()
    ours = np.concatenate([dali(datas[i:i + 64], plans[i:i + 64]).cpu().numpy() for i in range(0, len(datas), 64)])
    dali_s = time.perf_counter() - t
    naive = [None] * len(datas)
    if device == "cpu":
        run = naive_dali(resolution)
        naive = [img for i in range(0, len(datas), 64) for img in run(datas[i:i + 64])]
    t = time.perf_counter()
    [pil_preprocess(d, resolution) for d in datas]
    pil_s = time.perf_counter() - t
    print(f"\nresolution {resolution}: mean |DALI - PIL| on 0-255 (ADM-emulating pipeline vs naive one-step resize)")
    for name, _ in SIZE_CLASSES:
        idx = [i for i, (c, _) in enumerate(images) if c == name]
        gap = [np.abs(ours[i].astype(float) - refs[i]).mean() for i in idx]
        line = f"  {name:24s} n={len(idx):3d}  emulated mean {np.mean(gap):.3f} max {np.max(gap):.3f}"
        if naive[0] is not None:
            ngap = [np.abs(naive[i].astype(float) - refs[i]).mean() for i in idx]
            line += f"   naive mean {np.mean(ngap):.2f} max {np.max(ngap):.2f}"
        print(line)
    n = len(datas)
    print(f"  decode+resize+crop, batch of {n}: DALI-{device} {n / dali_s:.1f} img/s (2 threads), "
          f"PIL {n / pil_s:.1f} img/s (1 thread)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=12, help="images per size class")
    p.add_argument("--vae", default=None, help="AutoencoderKL hub id or path (default: tiny random one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    images = make_images(args.images)
    dali_device = "gpu" if args.device == "cuda" else "cpu"
    for resolution in (256, 512):
        pixel_gap(images, resolution, dali_device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tar(tmp / "bench-000.tar", [(f"{i:05d}", {"jpg": d, "cls": b"0"}) for i, (_, d) in enumerate(images)])
        vae = args.vae or str(save_tiny_vae(tmp / "vae"))
        print(f"\nend to end, {len(images)} images (all size classes), VAE {'tiny random' if not args.vae else vae}, "
              f"batch {args.batch_size}, {args.workers} workers, device {args.device}")
        for decoder in ("pil", "dali"):
            settings = Settings(inputs=expand_shards([str(tmp / "bench-000.tar")]), output=tmp / f"out-{decoder}",
                                resolution=256, vae=vae, batch_size=args.batch_size, workers=args.workers,
                                decoder=decoder, device=args.device)
            totals = Precompute(settings).run()
            print(f"  --decoder {decoder}: {totals['read'] / totals['seconds']:.1f} img/s "
                  f"({totals['written']} written in {totals['seconds']:.1f} s)")


if __name__ == "__main__":
    main()

"""Sample images from a trained checkpoint into an ADM-format npz, on one process or on many.

    python tools/sample.py --ckpt runs/demo --out samples.npz --num-samples 1000 \\
        [--cfg-scale 1.5] [--sampler ddpm|ddim|dpm_solver++] [--steps 50] [--grid grid.png] [--seed 0]
    python tools/sample.py --ckpt runs/demo-t2i --out t2i.npz --num-samples 16 --prompt "the digit 7" \\
        [--prompt ...] [--prompts FILE] [--text-encoder PATH --text-max-length N]
    python tools/sample.py --ckpt runs/imagenet --out samples.npz --num-samples 50000 \\
        [--vae stabilityai/sd-vae-ft-ema --scaling-factor 0.18215]
    torchrun --nproc_per_node 8 tools/sample.py --ckpt runs/demo --out samples.npz --num-samples 50000 ...

Writes ``arr_0`` (N, H, W, C) uint8 images and ``arr_1`` (N,) int64 class labels (classes cycle
0..K-1). Text-conditioned models (EC-DiT) take ``--prompt TEXT`` (repeatable) and/or ``--prompts FILE``;
samples cycle through the prompts, ``arr_1`` holds each sample's prompt index and ``prompts`` the prompts;
classifier-free guidance (``--cfg-scale``) is against the model's learned null caption; the grid has one
row per prompt, the prompt written beside it. Uses EMA weights unless ``--weights model``.

Models of VAE latents: each batch of latents is decoded into (H, W, 3) images before it is written, with the
VAE the training data was encoded with, as the checkpoint records it (its meta's ``vae``; an exported folder's
config.json ``vae_name_or_path``), divided by its ``scaling_factor`` first. ``--vae PATH_OR_ID`` (a diffusers
AutoencoderKL folder or hub id in the local cache) supplies one for a checkpoint without the record or
overrides it; ``--scaling-factor F`` sets the scale (default: the recorded one, else the VAE config's). A
latent model with no VAE recorded or given is an error (exit 1). The models of the embedded digits demos work
directly in pixel space (``vae`` "identity"), so their samples are the images; ``--vae identity`` writes any
model's samples as they are, as uint8.

Samples come in batches of ``--batch-size``; batch b starts from noise seeded by ``--seed`` + b. Under
torchrun (or srun) each rank samples a contiguous share of the batches on ``cuda:LOCAL_RANK`` (or the CPU) into
``<out>.rank<R>-of-<W>.npy``; rank 0 streams the parts into the npz and removes them. The npz is written
under a temporary name and renamed when complete, and it is the same for any number of ranks (given the
same ``--seed``, ``--batch-size`` and kind of device). A run that dies part-way may leave parts behind;
the next run with as many ranks overwrites them. A full disk is one error naming the file that did not fit
(exit 1): the parts and the temporary npz and grid are removed, an earlier npz or grid stays as it was.
"""

import math

import torch.distributed as dist

from ditmoe.cli import Positive, make_parser, user_errors
from ditmoe.eval.sample_npz import SampleSettings, sample_to_npz
from ditmoe.model.grouped_gemm import EXPERT_GEMMS
from ditmoe.parallel.distributed import init_distributed


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ or a checkpoint tag directory")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-samples", action=Positive, required=True, help="images to sample")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale >= 0: 1 (default) samples the class-conditional model "
                        "unguided, 0 the unconditional one, above 1 guides towards the class")
    p.add_argument("--sampler", help="ddpm (default for DDPM models) | ddim | dpm_solver++ | euler (rectified flow)")
    p.add_argument("--steps", action=Positive, help="sampling steps (default: 250 ddpm, 50 ddim/euler, "
                                                    "20 dpm_solver++)")
    p.add_argument("--guide-channels", action=Positive, help="guide only the first N channels (DiT used 3 of 4)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (default) or trained weights")
    p.add_argument("--batch-size", action=Positive, default=250, help="samples per batch; ranks sample whole batches")
    p.add_argument("--grid", help="also write a PNG grid (one row per class, up to 10 per row)")
    p.add_argument("--seed", type=int, default=0, help="batch b starts from noise seeded by SEED + b")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="text-conditioned models: a prompt (repeatable); samples cycle through the prompts")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE",
                   help="text-conditioned models: a file of prompts, one per line (after any --prompt)")
    p.add_argument("--text-encoder", metavar="PATH_OR_ID",
                   help="text encoder for the prompts: a registered name such as minilm, hub id or directory "
                        "(default: the one the checkpoint's data was embedded with)")
    p.add_argument("--text-max-length", action=Positive, help="caption tokens (default: the checkpoint's)")
    p.add_argument("--vae", metavar="PATH_OR_ID",
                   help="decode the sampled latents with this diffusers AutoencoderKL (folder or hub id) before "
                        "writing them (default: the VAE the checkpoint's data was encoded with; 'identity': write "
                        "the samples as they are)")
    p.add_argument("--scaling-factor", type=float, action=Positive, metavar="F",
                   help="the latents are divided by F before decoding (default: the checkpoint's record for its VAE, "
                        "else the VAE config's scaling_factor)")
    p.add_argument("--capacity-threshold", type=float, metavar="P",
                   help="models with a capacity predictor: an expert takes a token when the predicted probability "
                        "exceeds P (default: the model's capacity_threshold; higher: less compute)")
    p.add_argument("--expert-gemm", choices=EXPERT_GEMMS, default="auto",
                   help="kernel of the experts' grouped GEMMs: torch, triton (DeepSpeed's Triton kernel: never waits "
                        "for the GPU) or auto (default: Triton where torch would wait)")
    return p


def parse_args(argv=None) -> SampleSettings:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.out.endswith(".npz"):
        p.error(f"--out {args.out} must end in .npz")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        p.error(f"--cfg-scale must be a number >= 0 (1: no guidance), got {args.cfg_scale}")
    if args.scaling_factor is not None and not math.isfinite(args.scaling_factor):
        p.error(f"--scaling-factor must be a finite number > 0, got {args.scaling_factor}")
    if args.vae is not None and not args.vae.strip():
        p.error("--vae must name a VAE folder or hub id (or 'identity')")
    threshold = args.capacity_threshold
    if threshold is not None and not (math.isfinite(threshold) and 0 <= threshold <= 1):
        p.error(f"--capacity-threshold must be between 0 and 1, got {threshold}")
    return SampleSettings(**{**vars(args), "prompts": tuple(args.prompts)})


def main(argv=None):
    settings = parse_args(argv)
    rank, world, device = init_distributed()
    with user_errors():
        shape = sample_to_npz(settings, rank, world, device)
    if rank == 0:
        print(f"wrote {settings.num_samples} samples of shape {shape} to {settings.out}")
        if settings.grid:
            print(f"wrote grid {settings.grid}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

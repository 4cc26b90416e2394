"""python -m ditmoe.train --preset demo --out runs/demo [--steps N] [--resume auto] [--set KEY=VALUE ...]

Runs alone, or under torchrun / the deepspeed launcher / srun with the same flags.
"""

import argparse
import dataclasses
import json
import sys

from .config import apply_train_overrides, preset_train_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ditmoe.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="training preset ('demo') or any model preset name")
    p.add_argument("--out", help="output directory (metrics.jsonl, tensorboard/, checkpoints/)")
    p.add_argument("--data", help="'digits' or a directory of latent shards")
    p.add_argument("--steps", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int, help="per rank; the rest is gradient accumulation")
    p.add_argument("--seed", type=int)
    p.add_argument("--objective", choices=["ddpm", "rectified_flow"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--ep-size", type=int, help="expert-parallel group size (DeepSpeed AutoEP); divides experts and ranks")
    p.add_argument("--resume", help="'auto' (latest checkpoint in OUT, if any) or a checkpoint directory")
    p.add_argument("--resume-universal", action="store_true", default=None,
                   help="resume through DeepSpeed's universal checkpoint: another world size, ZeRO stage or EP size")
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON; batch sizes are filled from the flags")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training field (lr=3e-4) or a model field (model.depth=6); repeatable")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def build_config(args):
    config = preset_train_config(args.preset)
    flags = {
        "out": args.out, "data": args.data, "steps": args.steps, "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size, "seed": args.seed, "objective": args.objective,
        "precision": args.precision, "zero_stage": args.zero_stage, "ep_size": args.ep_size, "resume": args.resume,
        "resume_universal": args.resume_universal, "deepspeed_config": args.deepspeed_config,
    }
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    return apply_train_overrides(config, args.set)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if not config.data:
        sys.exit(f"error: preset {args.preset!r} has no default data: pass --data DIR_OF_LATENT_SHARDS")
    from ..parallel.distributed import shutdown_distributed
    from .loop import train
    from .final_eval import final_eval

    try:
        record = train(config)
        if config.data == "digits" and config.eval_samples > 0 and not record["preempted"]:
            record = {**record, **final_eval(config)}
    except (ValueError, FileNotFoundError) as err:  # bad input: the message names the file/key/option
        sys.exit(f"error: {err}")
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()

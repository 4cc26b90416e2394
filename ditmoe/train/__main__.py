"""python -m ditmoe.train [--preset demo | --config FILE] --out DIR [--steps N] [--resume auto] [--set KEY=VALUE ...]

Settings come from the preset's defaults, then the experiment file (--config FILE: .toml, .yaml or .yml),
then the flags and --set items. --list-settings lists every setting with its type, default and meaning.
Runs alone, or under torchrun / the deepspeed launcher / srun with the same flags.
"""

import argparse
import json

from ..cli import make_parser, user_errors
from ..data.latent_format import CorruptShardError
from ..model import get_preset
from ..settings import describe, field_docs
from .config import OBJECTIVES, PRECISIONS, TrainConfig, apply_settings, preset_train_config, read_experiment

DOCS = field_docs(TrainConfig)


def build_parser():
    p = make_parser(__doc__, prog="python -m ditmoe.train")
    p.add_argument("--preset", help="training preset ('demo', 'demo-t2i') or any model preset name (default: demo)")
    p.add_argument("--config", metavar="FILE",
                   help="experiment file: preset and training settings, model settings in a 'model' table")
    p.add_argument("--list-settings", action="store_true",
                   help="print every --set key with its type, default and meaning, then exit")
    p.add_argument("--out", help=DOCS["out"])
    p.add_argument("--data", help=DOCS["data"])
    p.add_argument("--val-data", metavar="DIR", help=DOCS["val_data"])
    p.add_argument("--eval-ref", metavar="NPZ", help=DOCS["eval_ref"])
    p.add_argument("--steps", type=int, help=DOCS["steps"])
    p.add_argument("--global-batch-size", type=int, help=DOCS["global_batch_size"])
    p.add_argument("--micro-batch-size", type=int, help=DOCS["micro_batch_size"])
    p.add_argument("--seed", type=int, help=DOCS["seed"])
    p.add_argument("--objective", choices=OBJECTIVES, help=DOCS["objective"])
    p.add_argument("--precision", choices=PRECISIONS, help=DOCS["precision"])
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help=DOCS["zero_stage"])
    p.add_argument("--ep-size", type=int, help=DOCS["ep_size"])
    p.add_argument("--activation-checkpointing", type=int, metavar="N", help=DOCS["activation_checkpointing"])
    p.add_argument("--resume", help=DOCS["resume"])
    p.add_argument("--init-from", metavar="DIR", help=DOCS["init_from"])
    p.add_argument("--overwrite", action="store_true", default=None, help=DOCS["overwrite"])
    p.add_argument("--resume-universal", action="store_true", default=None, help=DOCS["resume_universal"])
    p.add_argument("--deepspeed-config", metavar="FILE", help=DOCS["deepspeed_config"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting (lr=3e-4) or a model setting (model.depth=6); repeatable")
    p.add_argument("--local-rank", type=int, aliases=["--local_rank"], help=argparse.SUPPRESS)  # deepspeed launcher
    return p


FLAG_FIELDS = (
    "preset", "out", "data", "val_data", "eval_ref", "steps", "global_batch_size", "micro_batch_size", "seed",
    "objective", "precision",
    "zero_stage", "ep_size", "activation_checkpointing", "resume", "init_from", "overwrite", "resume_universal",
    "deepspeed_config",
)


def parse_settings(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    """The flags and the settings they resolve to. A bad experiment file is a runtime error (exit 1, the file
    named); a bad flag or ``--set`` item is a usage error (exit 2, the setting named)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors():
        experiment = read_experiment(args.config) if args.config else ({}, {})
    try:
        return args, apply_settings(experiment, {name: getattr(args, name) for name in FLAG_FIELDS}, args.set)
    except ValueError as err:
        parser.error(str(err))


def settings_listing(preset: str) -> str:
    """Every ``--set`` key of ``preset`` (training keys, then ``model.KEY``): type, default and doc."""
    rows = describe(preset_train_config(preset), exclude=("model_overrides",)) + describe(get_preset(preset), "model.")
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"Settings with the defaults of preset {preset!r} (--set KEY=VALUE; a --config file has the model.KEY "
             "settings as KEY in its model table):"]
    lines += ["  " + "  ".join(text.ljust(width) for text, width in zip(row, widths)) + "  " + row[3] for row in rows]
    return "\n".join(lines)


def main(argv=None):
    args, config = parse_settings(argv)
    with user_errors(CorruptShardError):
        if args.list_settings:
            print(settings_listing(config.preset))
            return
        if not config.data:
            raise ValueError(f"preset {config.preset!r} has no default data: pass --data DIR_OF_LATENT_SHARDS")
        from ..parallel.distributed import shutdown_distributed
        from .final_eval import final_eval
        from .trainer import train

        record = train(config)
        if config.data in ("digits", "digits-t2i") and config.eval_samples > 0 and not record["preempted"]:
            record = {**record, **final_eval(config)}
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()

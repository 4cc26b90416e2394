"""Sparse upcycling: turn a dense DiT checkpoint into the initial weights of a DiT-MoE.

    python tools/upcycle.py --ckpt runs/dense --out upcycled/dense-8e \\
        --set num_experts=8 --set top_k=2 --set norm_topk_prob=true --set expert_activation=gelu \\
        --set num_shared_experts=0 [--tag latest] [--weights ema|model]
    python tools/upcycle.py --from dit --ckpt DiT-XL-2-256x256.pt --out upcycled/xl-8e \\
        --preset DiT-MoE-XL/2-8E2A --set expert_activation=gelu --set norm_topk_prob=true --drop-mlp-biases
    python -m ditmoe.train --init-from upcycled/dense-8e [the model settings it prints] ...

Sources: a ditmoe dense training checkpoint (run, checkpoints/ or tag directory; EMA weights, or the trained
ones with --weights model), or with --from dit a facebookresearch DiT .pt (a plain state dict; read with
weights_only=True). Target: the source's model config (or --preset NAME) with the --set overrides (KEY=VALUE,
or model.KEY=VALUE as the trainer takes them); only the MoE settings may differ from the source's.

Rules:
  * every MoE block's routed experts are GELU copies of that block's dense MLP: expert_activation=gelu and
    expert_ratio == mlp_ratio (SwiGLU targets are refused: no SwiGLU computes a GELU MLP);
  * the router is fresh, N(0, --router-std); shared experts are fresh with a zero output projection (they add
    nothing at first); a capacity predictor is fresh; everything else (dense blocks' MLPs too) is copied;
  * with token choice and norm_topk_prob=true (or top_k == num_experts) the routed output is
    sum_k w_k MLP(x) = MLP(x): right after upcycling the MoE model computes the dense model's function;
  * ditmoe's experts have no biases, and no bias-free FFN holds a dense MLP's biases (it maps 0 to 0): the MLP
    biases of the MoE blocks must be zero, or --drop-mlp-biases drops them (an approximation);
  * not exact, by design or by nature, and said so: --noise-std > 0 (noise on each expert copy breaks the
    experts' symmetry), expert choice routing (a token may go to 0 or several experts), norm_topk_prob=false;
  * every source tensor is accounted for (copied, into experts, zero bias, dropped bias, checked pos_embed) and
    every target tensor too (copied, experts, fresh router / shared experts / capacity predictor, computed
    pos_embed): the tool prints the counts and fails on any tensor left over.

Output: OUT/upcycled.pt (ditmoe names, fp32, weights_only-loadable) and OUT/upcycle.json (the target model
config, the source, the scheme, exactness notes, the counts), for ``python -m ditmoe.train --init-from OUT``
(weights only: fresh optimizer, step 0). Both are written aside (``*.partial``) and renamed when both are
complete: a full disk is one error naming the file (exit 1), and an upcycled model already in OUT stays.
"""

import argparse
import dataclasses
from pathlib import Path

from ditmoe.checkpoint import load_engine_module_state, load_full_ema, read_meta, resolve_checkpoint
from ditmoe.cli import Positive, make_parser, user_errors
from ditmoe.hf.official import infer_config
from ditmoe.model import PRESETS, DiTConfig, get_preset
from ditmoe.settings import apply_overrides, format_value
from ditmoe.train.init_from import init_files, write_init_weights
from ditmoe.weights import dit
from ditmoe.weights.safe_load import safe_load
from ditmoe.weights.upcycle import POS_EMBED, output_difference, upcycle

#: Largest |MoE - dense| --verify accepts from an exact upcycling (fp32, kernels summing in other orders).
VERIFY_ATOL = 1e-4


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="ditmoe run, checkpoints/ or tag directory; a .pt with --from dit")
    p.add_argument("--out", required=True, help="output folder: upcycled.pt and upcycle.json")
    p.add_argument("--from", dest="source", choices=["ditmoe", "dit"], default="ditmoe",
                   help="ditmoe dense training checkpoint (default) or a facebookresearch DiT .pt")
    p.add_argument("--tag", help="ditmoe checkpoints: the tag to read (default: the latest)")
    p.add_argument("--weights", choices=["ema", "model"], help="ditmoe checkpoints: EMA (default) or trained weights")
    p.add_argument("--num-heads", action=Positive,
                   help="--from dit: attention heads (default: the --preset's if as wide, else the published size's)")
    p.add_argument("--preset", help="target model preset (default: the source's model config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a target model setting: KEY=VALUE, or model.KEY=VALUE as the trainer takes it; "
                        "repeatable (e.g. num_experts=8, top_k=2, norm_topk_prob=true, expert_activation=gelu)")
    p.add_argument("--noise-std", type=non_negative, default=0.0,
                   help="std of Gaussian noise added to each expert copy (default 0: exact; > 0 breaks the "
                        "experts' symmetry and the exact equality)")
    p.add_argument("--router-std", type=non_negative, default=0.02,
                   help="std of the fresh router weights (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh tensors and the noise (default 0)")
    p.add_argument("--drop-mlp-biases", action="store_true",
                   help="drop non-zero MLP biases of the MoE blocks (the experts have none): approximate upcycling")
    p.add_argument("--verify", action="store_true",
                   help=f"run the dense and the MoE model on random inputs and print the largest difference; an "
                        f"upcycling meant to be exact fails above {VERIFY_ATOL:g}")
    p.add_argument("--overwrite", action="store_true", help="replace an upcycled model already in --out")
    return p


def check_args(parser, args) -> list[str]:
    """Usage errors found without reading the checkpoint; returns the --set items without ``model.``."""
    if args.source == "dit" and (args.tag or args.weights):
        parser.error("--tag/--weights: a --from dit .pt holds one set of weights")
    if args.source == "ditmoe" and args.num_heads:
        parser.error("--num-heads: only for --from dit (a ditmoe checkpoint records its config)")
    if args.preset:
        try:
            get_preset(args.preset)
        except ValueError as err:
            parser.error(f"--preset: {err}")
    items = [item.removeprefix("model.") for item in args.set]
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or key not in names:
            parser.error(f"--set {item!r}: expected KEY=VALUE with a model setting KEY; valid keys: "
                         f"{', '.join(sorted(names))}")
    return items


def read_dit_file(path: Path) -> dict:
    """A facebookresearch DiT .pt: a bare state dict, or one under "ema"/"model"/"state_dict"/"module"."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        return dit.unwrap_state_dict(safe_load(path), path)
    except KeyError as err:
        raise ValueError(str(err.args[0])) from None


def load_source(args) -> tuple[dict, DiTConfig, dict]:
    """(dense weights in ditmoe's names, pos_embed included when stored; their config; provenance)."""
    path = Path(args.ckpt)
    if args.source == "dit":
        raw = read_dit_file(path)
        try:
            state = dit.to_ditmoe(raw)  # renames the attention, checks and drops pos_embed, fp32
            heads = args.num_heads
            preset = get_preset(args.preset) if args.preset else None
            if heads is None and preset and preset.hidden_size == raw["x_embedder.proj.weight"].shape[0]:
                heads = preset.num_heads
            config = infer_config(raw, "dit", num_heads=heads)
        except (KeyError, ValueError) as err:
            raise ValueError(f"checkpoint {path}: {err.args[0]}") from None
        state[POS_EMBED] = raw[POS_EMBED]
        return state, config, {"kind": "dit", "path": str(path.resolve()), "tensors": len(raw)}
    if path.is_file():
        raise ValueError(f"checkpoint {path} is a file: a ditmoe checkpoint is a directory; pass --from dit for a "
                         "facebookresearch DiT .pt")
    tag_dir = resolve_checkpoint(path, args.tag or "latest")
    meta = read_meta(tag_dir)
    config = DiTConfig.from_dict(meta["model_config"])
    weights = args.weights or "ema"
    state = load_full_ema(tag_dir) if weights == "ema" else load_engine_module_state(tag_dir)
    train = meta.get("train_config") or {}
    return ({k: v.float() for k, v in state.items()}, config,
            {"kind": "ditmoe", "path": str(tag_dir.resolve()), "weights": weights, "step": meta.get("step"),
             "preset": train.get("preset"), "tensors": len(state)})


def target_config(parser, args, items: list[str], source: DiTConfig) -> DiTConfig:
    base = get_preset(args.preset) if args.preset else source
    try:
        return apply_overrides(base, items, "model")
    except ValueError as err:
        parser.error(f"--set: {err}")


def train_flags(config: DiTConfig, preset: str | None) -> list[str]:
    """``--preset P --set model.K=V ...`` that give the trainer ``config``: ``preset`` (else the preset closest to
    it) and the fields it sets otherwise."""
    def differing(name):
        base = get_preset(name)
        return [f.name for f in dataclasses.fields(DiTConfig) if getattr(base, f.name) != getattr(config, f.name)]

    if preset not in PRESETS:
        preset = min(PRESETS, key=lambda name: len(differing(name)))
    flags = ["--preset", preset]
    for key in differing(preset):
        flags += ["--set", f"model.{key}={format_value(getattr(config, key))}"]
    return flags


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    items = check_args(parser, args)
    with user_errors(RuntimeError):
        weights_file, record_file = init_files(args.out)
        if not args.overwrite and (weights_file.exists() or record_file.exists()):
            raise FileExistsError(f"{args.out} already holds an upcycled model: pass --overwrite to replace it")
        source, source_config, provenance = load_source(args)
        config = target_config(parser, args, items, source_config)
        result = upcycle(source, source_config, config, noise_std=args.noise_std, router_std=args.router_std,
                         seed=args.seed, drop_mlp_biases=args.drop_mlp_biases)
        difference = None
        if args.verify:
            difference = output_difference(source, source_config, result.state, config)
            if result.exact and difference > VERIFY_ATOL:
                raise ValueError(f"--verify: the upcycled model differs from the dense one by {difference:.3g} "
                                 f"(> {VERIFY_ATOL:g}) although the scheme is exact")
        flags = train_flags(config, args.preset or provenance.get("preset"))
        write_init_weights(args.out, result.state, config, {
            "source": {**provenance, "model_config": source_config.to_dict()},
            "scheme": {"noise_std": args.noise_std, "router_std": args.router_std, "seed": args.seed,
                       "drop_mlp_biases": args.drop_mlp_biases},
            "exact": result.exact, "notes": result.notes, "counts": result.counts(),
            "max_output_difference": difference, "train_flags": flags,
        })
    moe_blocks = sum(config.moe_in_block(i) for i in range(config.depth))
    routing = f"top-{config.top_k} token choice" if config.routing == "token_choice" else "expert choice"
    print(f"upcycled {args.source}:{args.ckpt} -> {args.out}: {config.num_experts} GELU experts, {routing}, "
          f"{moe_blocks} MoE blocks of {config.depth}")
    print(result.table())
    if result.exact:
        print("exact: yes, the MoE model computes the dense model's function")
    else:
        print("exact: no")
        for note in result.notes:
            print(f"  note: {note}")
    if difference is not None:
        print(f"max |MoE - dense| on random inputs: {difference:.3g}")
    print(f"wrote {weights_file} and {record_file}; train from them with:\n"
          f"  python -m ditmoe.train {' '.join(flags)} --init-from {args.out}")


if __name__ == "__main__":
    main()

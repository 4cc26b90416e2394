"""Print total/activated parameters and forward GFLOPs of a preset, computed on the meta device.

    python tools/model_card.py --preset DiT-MoE-G/2-16E2A [--json] [--set model.routing=expert_choice ...]

Text-conditioned presets (EC-DiT-*) count the caption projection and cross-attention; the frozen text encoder
they assume is printed apart and not counted.
"""

import json

from ditmoe.cli import make_parser
from ditmoe.model import PRESETS, get_preset
from ditmoe.model.card import model_card
from ditmoe.model.presets import text_encoder_of
from ditmoe.settings import apply_overrides


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--preset", help="model preset name (see --list)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model setting: KEY=VALUE, or model.KEY=VALUE as the trainer takes it")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list the preset names")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(PRESETS))
        return
    if not args.preset:
        parser.error("--preset is required (or --list)")
    try:
        config = apply_overrides(get_preset(args.preset), [item.removeprefix("model.") for item in args.set], "model")
    except ValueError as err:
        parser.error(str(err))
    encoder = text_encoder_of(args.preset) if config.is_text else None
    card = {"preset": args.preset, **model_card(config, encoder), "config": config.to_dict()}
    if args.json:
        print(json.dumps(card, indent=2))
        return
    print(f"{args.preset}: {card['params_total_M']:.2f}M total, {card['params_activated_M']:.2f}M activated parameters")
    print(f"  forward at latent {card['latent_shape']}: {card['gflops_paper']:.2f} GFLOPs (linear MACs, paper), "
          f"{card['gmacs_with_attention']:.2f} GMACs with attention, {card['gflops_full']:.2f} GFLOPs full")
    if config.is_text:
        print(f"  captions of {config.text_len} tokens of width {config.text_dim} (projection and cross-attention "
              f"included); text encoder, not counted: {card['text_encoder'] or 'unknown'}")


if __name__ == "__main__":
    main()

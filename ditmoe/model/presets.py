"""Named model presets: the paper's DiT-MoE sizes, dense DiT, EC-DiT's text-conditioned sizes, and small ones
for tests and the demo."""

from typing import NamedTuple

from .config import DiTConfig

# name: (depth, hidden_size, num_heads), as in DiT and DiT-MoE.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}

# EC-DiT (arXiv 2410.02098, Table 1): name: (depth, hidden_size, num_heads, num_kv_heads). Table 1 gives M
# two depths: 46 layers for the dense model, 38 for EC-DiT-M-64E. The M presets take 38, the depth of the only
# sparse M the paper trains (its 97.21B total and 8.27B activated parameters need exactly 19 MoE layers of 64
# experts); tests/model/test_ec_dit_presets.py checks the counts against the paper's.
_EC_DIT_SIZES = {
    "XL": (28, 1152, 18, 6),
    "XXL": (38, 1536, 24, 6),
    "3XL": (42, 2304, 36, 6),
    "M": (38, 3072, 48, 12),
}


class TextEncoder(NamedTuple):
    """The frozen text encoder a text preset assumes; it is not part of the model (nor of its card's totals)."""

    name: str
    hf_id: str
    params: int

    def __str__(self) -> str:
        return f"{self.name}, {self.params / 1e9:.2f}B parameters"


# google/t5-v1_1-xxl's encoder (transformers' T5EncoderModel), from the hub's config.json
# (https://huggingface.co/google/t5-v1_1-xxl/blob/main/config.json: d_model 4096, d_ff 10240, d_kv 64,
# num_heads 64, num_layers 24, vocab_size 32128, gated-gelu, untied): embedding 32128·4096, per layer q/k/v/o
# 4·4096² + wi_0/wi_1/wo 3·4096·10240 + 2 RMSNorm scales, relative-position bias 32·64, final norm 4096
# = 4,762,310,656 (the 4.7B of PixArt-α's T5 encoder).
T5_V1_1_XXL = TextEncoder("T5-v1.1-XXL encoder", "google/t5-v1_1-xxl", 4_762_310_656)

#: The text encoder each text-conditioned preset assumes (filled by _build_presets).
PRESET_TEXT_ENCODERS: dict[str, TextEncoder] = {}


def _ec_dit_presets() -> dict[str, DiTConfig]:
    """EC-DiT-{XL,XXL,3XL,M}-{8,16,32,64}E: 256px (32×32×4 latent, patch 2), T5-XXL captions of 120 tokens,
    expert choice (capacity factor 2, no auxiliary loss) in every other block, GELU experts of width 4d."""
    presets = {}
    for size, (depth, hidden, heads, kv_heads) in _EC_DIT_SIZES.items():
        base = DiTConfig(
            input_size=32, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth, num_heads=heads,
            num_kv_heads=kv_heads, learn_sigma=False, text_dim=4096, text_len=120, routing="expert_choice",
            capacity_factor=2.0, moe_placement="every_other", expert_activation="gelu", expert_ratio=4.0,
            num_shared_experts=0,
        )
        for experts in (8, 16, 32, 64):
            name = f"EC-DiT-{size}-{experts}E"
            presets[name] = base.replace(num_experts=experts)
            PRESET_TEXT_ENCODERS[name] = T5_V1_1_XXL
    presets["EC-DiT-tiny"] = DiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_kv_heads=2,
        learn_sigma=False, text_dim=16, text_len=8, num_experts=4, routing="expert_choice", capacity_factor=2.0,
        moe_placement="every_other", expert_activation="gelu", expert_ratio=4.0, num_shared_experts=0,
    )
    return presets


def text_encoder_of(name: str) -> TextEncoder | None:
    """The text encoder preset ``name`` assumes (None for class-conditional and test presets)."""
    return PRESET_TEXT_ENCODERS.get(name)


def _build_presets() -> dict[str, DiTConfig]:
    presets = {}
    for size, (depth, hidden, heads) in _SIZES.items():
        base = DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads)
        for patch in (2, 4, 8):
            if size != "G":
                presets[f"DiT-{size}/{patch}"] = base.replace(patch_size=patch)
            for experts in (8, 16):
                if size == "G" and (patch, experts) != (2, 16):
                    continue
                presets[f"DiT-MoE-{size}/{patch}-{experts}E2A"] = base.replace(
                    patch_size=patch, num_experts=experts, top_k=2
                )
    presets["tiny"] = DiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
        num_classes=10, num_experts=4, top_k=2,
    )
    presets["tiny-ec"] = presets["tiny"].replace(routing="expert_choice", capacity_factor=2.0)
    presets["demo"] = DiTConfig(
        input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
        num_classes=10, num_experts=4, top_k=2,
    )
    # the text-to-image digits demo: the demo's size, EC-DiT's choices (GQA, expert choice in every other block,
    # GELU experts, no shared experts), captions from the tiny CLIP encoder the trainer builds (width 16, 8 tokens)
    presets["demo-t2i"] = presets["demo"].replace(
        num_kv_heads=2, text_dim=16, text_len=8, routing="expert_choice", capacity_factor=2.0,
        moe_placement="every_other", expert_activation="gelu", num_shared_experts=0,
    )
    # the same on captions embedded by the pretrained MiniLM (384-d token states, captions padded to 10 tokens)
    presets["demo-t2i-minilm"] = presets["demo-t2i"].replace(text_dim=384, text_len=10)
    presets.update(_ec_dit_presets())
    return presets


PRESETS = _build_presets()


def get_preset(name: str) -> DiTConfig:
    """Return the config of a named preset; unknown names raise a ValueError listing the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]

"""Named model presets: the paper's DiT-MoE sizes, dense DiT, and small ones for tests and the demo."""

from .config import DiTConfig

# name: (depth, hidden_size, num_heads), as in DiT and DiT-MoE.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}


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
    return presets


PRESETS = _build_presets()


def get_preset(name: str) -> DiTConfig:
    """Return the config of a named preset; unknown names raise a ValueError listing the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]

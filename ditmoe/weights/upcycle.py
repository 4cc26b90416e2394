"""Sparse upcycling: a dense DiT's weights (ditmoe's names) -> the initial weights of a DiT-MoE.

Scheme (exact for token choice): in every MoE block of the target, each of the E routed GELU experts is a
copy of the block's dense MLP (``experts.up_proj[e] = mlp.fc1.weight``, ``experts.down_proj[e] =
mlp.fc2.weight``); with token choice the routed output is ``sum_k w_k MLP(u) = MLP(u)`` as soon as the k
routing weights sum to 1 (``norm_topk_prob=True``, or ``top_k == num_experts``), whatever the router says. The
router ``gate`` is fresh, N(0, router_std); shared experts are fresh with a zero output projection
(``shared_experts.fc2.weight = 0``: they add nothing until trained, like adaLN-Zero); a capacity predictor
is fresh (Xavier, zero biases). Every other tensor, the MLPs of dense blocks included, is copied.

Biases. ditmoe's experts and shared experts have no biases, and no bias-free FFN can hold the dense MLP's
biases: every bias-free GELU FFN maps u = 0 to 0, the dense MLP maps it to ``fc2(gelu(fc1.bias)) +
fc2.bias``. So the upcycling is exact only when the MLP biases of the MoE blocks are zero (they are checked,
and then accounted as "zero biases"); otherwise :func:`upcycle` refuses, unless ``drop_mlp_biases`` drops
them (an approximation, reported). Exact upcycling of biased MLPs needs experts with biases in the model.

Not exact by design or by nature (reported as notes, ``Upcycled.exact`` False): ``noise_std > 0`` (Gaussian
noise added to each expert copy to break the experts' symmetry); expert choice routing (a token may be taken
by 0 or several experts, with weights that do not sum to 1); token choice without ``norm_topk_prob`` (the
output is scaled by the sum of the top-k router probabilities). Refused: SwiGLU experts (no SwiGLU computes
a GELU MLP), an expert width other than the MLP's, a source with experts, and any architecture field of
the target (width, depth, heads, patch, classes, ...) other than the source's.

Every tensor is accounted for: :class:`Upcycled` says what became of each source tensor and where each
target tensor came from; a source tensor nothing uses, or a target tensor nothing makes, is an error.
"""

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..model import DiT, DiTConfig
from ..model.conditioning import Caption
from ..model.embeddings import sincos_2d

#: DiTConfig fields an upcycling may set: the MoE layer's. Every other field must equal the source's.
MOE_FIELDS = frozenset({
    "num_experts", "top_k", "routing", "capacity_factor", "norm_topk_prob", "expert_ratio", "expert_activation",
    "num_shared_experts", "shared_expert_ratio", "moe_placement", "balance_loss_alpha", "routing_pool",
    "routing_group_size", "capacity_predictor", "capacity_threshold", "capacity_predictor_weight",
})

# What became of a source tensor.
SOURCE_COPIED = "copied"  # into the target tensor of the same name
SOURCE_EXPERTS = "into experts"  # an MLP weight of an MoE block, copied into every expert
SOURCE_ZERO_BIAS = "zero MLP bias"  # an MLP bias of an MoE block, checked to be zero (the experts have none)
SOURCE_DROPPED_BIAS = "dropped MLP bias"  # a non-zero MLP bias of an MoE block, dropped (drop_mlp_biases)
SOURCE_CHECKED = "checked pos_embed"  # the fixed positional table, checked against the one ditmoe computes
SOURCE_KINDS = (SOURCE_COPIED, SOURCE_EXPERTS, SOURCE_ZERO_BIAS, SOURCE_DROPPED_BIAS, SOURCE_CHECKED)

# Where a target tensor came from.
TARGET_COPIED = "copied"
TARGET_EXPERTS = "experts from the MLP"
TARGET_ROUTER = "fresh router"
TARGET_SHARED = "fresh shared experts"
TARGET_PREDICTOR = "fresh capacity predictor"
TARGET_COMPUTED = "computed pos_embed"
TARGET_KINDS = (TARGET_COPIED, TARGET_EXPERTS, TARGET_ROUTER, TARGET_SHARED, TARGET_PREDICTOR, TARGET_COMPUTED)

POS_EMBED = "pos_embed"
#: Largest difference |MoE - dense| an exact upcycling may show in fp32 (:func:`output_difference`).
EXACT_ATOL = 1e-5


@dataclass
class Upcycled:
    """The target's state dict (ditmoe's names, fp32) and the record of how it was made."""

    state: dict[str, torch.Tensor]
    source_kinds: dict[str, str]  # every source tensor -> one of SOURCE_KINDS
    target_kinds: dict[str, str]  # every target tensor -> one of TARGET_KINDS
    notes: list[str] = field(default_factory=list)  # why the MoE model does not compute the dense one's function

    @property
    def exact(self) -> bool:
        """Whether the MoE model computes exactly the dense model's function (up to float rounding)."""
        return not self.notes

    def counts(self) -> dict[str, dict[str, int]]:
        """{"source": {kind: tensors}, "target": {kind: tensors}}, every kind listed (0 when none)."""
        source, target = Counter(self.source_kinds.values()), Counter(self.target_kinds.values())
        return {"source": {kind: source[kind] for kind in SOURCE_KINDS},
                "target": {kind: target[kind] for kind in TARGET_KINDS}}

    def table(self) -> str:
        """The counts as a text table: source tensors by fate, target tensors by origin, with totals."""
        counts = self.counts()
        width = max(len(kind) for kind in (*SOURCE_KINDS, *TARGET_KINDS))
        lines = []
        for side, kinds in (("source", counts["source"]), ("target", counts["target"])):
            lines.append(f"{side} tensors: {sum(kinds.values())}")
            lines += [f"  {kind.ljust(width)}  {count:6d}" for kind, count in kinds.items()]
        return "\n".join(lines)


def exactness_notes(target: DiTConfig, noise_std: float) -> list[str]:
    """Why the upcycled ``target`` will not compute the dense model's function (empty: it will, exactly)."""
    notes = []
    if target.routing == "expert_choice":
        notes.append("expert choice routing: a token is taken by 0, 1 or several experts with weights that do not sum "
                     "to 1, so the MoE model does not equal the dense one (upcycling is exact for token choice only)")
    elif not target.norm_topk_prob and target.top_k < target.num_experts:
        notes.append(f"token choice without norm_topk_prob: each token's output is scaled by the sum of its top-"
                     f"{target.top_k} router probabilities (< 1); --set norm_topk_prob=true makes it exact")
    if noise_std > 0:
        notes.append(f"noise_std={noise_std}: each expert copy has its own Gaussian noise (breaks the experts' "
                     "symmetry, and exact equality by design)")
    return notes


def check_compatible(source: DiTConfig, target: DiTConfig) -> None:
    """ValueError unless ``target`` is an MoE config into which ``source`` (dense) can be upcycled."""
    if source.is_moe:
        raise ValueError(f"the source already has experts (num_experts={source.num_experts}): upcycling starts from a "
                         "dense DiT (num_experts=0)")
    if not target.is_moe:
        raise ValueError("the target config is dense (num_experts=0): set its experts, e.g. --set num_experts=8")
    src, tgt = source.to_dict(), target.to_dict()
    differ = sorted(key for key in tgt if key not in MOE_FIELDS and src.get(key) != tgt[key])
    if differ:
        details = ", ".join(f"{key}: source {src.get(key)!r} vs target {tgt[key]!r}" for key in differ)
        raise ValueError(f"the target's architecture differs from the source's outside the MoE layers ({details}): "
                         "only the MoE settings may change")
    if target.expert_activation != "gelu":
        raise ValueError(f"expert_activation={target.expert_activation!r}: a SwiGLU expert cannot compute the dense "
                         "GELU MLP, so there is no exact upcycling into SwiGLU experts; upcycle into GELU experts: "
                         "--set expert_activation=gelu (with --set norm_topk_prob=true for token choice)")
    mlp_hidden = int(source.mlp_ratio * source.hidden_size)
    if target.expert_hidden != mlp_hidden:
        raise ValueError(f"expert width {target.expert_hidden} (expert_ratio={target.expert_ratio}) differs from the "
                         f"dense MLP's width {mlp_hidden} (mlp_ratio={source.mlp_ratio}): every expert is a copy of "
                         f"the MLP, so set --set expert_ratio={source.mlp_ratio}")


def target_shapes(config: DiTConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of ``DiT(config)``'s state dict, from a model on the meta device."""
    with torch.device("meta"):
        model = DiT(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def moe_prefixes(config: DiTConfig) -> list[str]:
    """``blocks.{i}.mlp.`` of every MoE block of ``config``."""
    return [f"blocks.{i}.mlp." for i in range(config.depth) if config.moe_in_block(i)]


def upcycle(source: dict[str, torch.Tensor], source_config: DiTConfig, target_config: DiTConfig, *,
            noise_std: float = 0.0, router_std: float = 0.02, seed: int = 0,
            drop_mlp_biases: bool = False) -> Upcycled:
    """The target's weights from the dense ``source`` (ditmoe's names; ``pos_embed`` optional), see the module
    docstring. ``seed`` draws the fresh tensors and the noise; the global RNG is left alone.

    ValueError for an incompatible target, non-zero MLP biases in MoE blocks (unless ``drop_mlp_biases``), a
    shape that does not fit, or a missing or an unexpected source tensor."""
    if noise_std < 0 or router_std < 0:
        raise ValueError(f"noise_std={noise_std} and router_std={router_std} must be >= 0")
    check_compatible(source_config, target_config)
    shapes = target_shapes(target_config)
    generator = torch.Generator().manual_seed(seed)
    out = Upcycled(state={}, source_kinds={}, target_kinds={}, notes=exactness_notes(target_config, noise_std))
    if POS_EMBED in source:
        _check_pos_embed(source[POS_EMBED], target_config)
        out.source_kinds[POS_EMBED] = SOURCE_CHECKED
    prefixes = moe_prefixes(target_config)
    for prefix in prefixes:
        _upcycle_layer(prefix, source, shapes, generator, out, noise_std=noise_std, router_std=router_std,
                       drop_mlp_biases=drop_mlp_biases)
    for name, shape in shapes.items():
        if name == POS_EMBED:
            out.state[name] = sincos_2d(target_config.hidden_size,
                                        target_config.input_size // target_config.patch_size).unsqueeze(0)
            out.target_kinds[name] = TARGET_COMPUTED
        elif not name.startswith(tuple(prefixes)):
            out.state[name] = _take(source, name, shape).float().clone()
            out.source_kinds[name], out.target_kinds[name] = SOURCE_COPIED, TARGET_COPIED
    unused = sorted(set(source) - set(out.source_kinds))
    if unused:
        raise ValueError(f"unexpected source tensor(s) for this architecture: {unused[:8]}")
    out.state = {name: out.state[name] for name in shapes}  # the model's order
    return out


def _upcycle_layer(prefix: str, source: dict, shapes: dict, generator: torch.Generator, out: Upcycled, *,
                   noise_std: float, router_std: float, drop_mlp_biases: bool) -> None:
    """The tensors of MoE layer ``prefix`` (``blocks.{i}.mlp.``) from the dense MLP of the same block."""
    up, down = shapes[prefix + "experts.up_proj"], shapes[prefix + "experts.down_proj"]  # (E, F, D), (E, D, F)
    num_experts = up[0]
    fc1 = _take(source, prefix + "fc1.weight", up[1:]).float()
    fc2 = _take(source, prefix + "fc2.weight", down[1:]).float()
    out.source_kinds[prefix + "fc1.weight"] = out.source_kinds[prefix + "fc2.weight"] = SOURCE_EXPERTS
    for weight, name in ((fc1, "experts.up_proj"), (fc2, "experts.down_proj")):
        experts = weight.unsqueeze(0).repeat(num_experts, 1, 1)
        if noise_std > 0:
            experts += noise_std * torch.randn(experts.shape, generator=generator)
        out.state[prefix + name] = experts
        out.target_kinds[prefix + name] = TARGET_EXPERTS
    for bias_name, size in (("fc1.bias", up[1]), ("fc2.bias", down[1])):
        bias = _take(source, prefix + bias_name, torch.Size([size]))
        if not torch.count_nonzero(bias):
            out.source_kinds[prefix + bias_name] = SOURCE_ZERO_BIAS
        elif drop_mlp_biases:
            out.source_kinds[prefix + bias_name] = SOURCE_DROPPED_BIAS
            note = "drop_mlp_biases: the non-zero MLP biases of the MoE blocks were dropped (the experts have none)"
            if note not in out.notes:
                out.notes.append(note)
        else:
            raise ValueError(
                f"{prefix}{bias_name} is not zero (max |b| = {bias.abs().max().item():.3g}): ditmoe's experts have no "
                "biases and no bias-free FFN can hold the dense MLP's, so the upcycled model would not equal the "
                "dense one; pass --drop-mlp-biases to upcycle without them (an approximation)")
    for name, shape in shapes.items():
        if name.startswith(prefix) and name not in out.state:
            out.state[name], out.target_kinds[name] = _fresh(name, prefix, shape, generator, router_std)


def _fresh(name: str, prefix: str, shape: torch.Size, generator: torch.Generator,
           router_std: float) -> tuple[torch.Tensor, str]:
    """A fresh tensor of MoE layer ``prefix`` and its kind: router N(0, router_std); shared experts Xavier with a
    zero output projection (they add nothing at first); capacity predictor Xavier, zero biases (as DiT does)."""
    leaf = name.removeprefix(prefix)
    if leaf == "gate.weight":
        return torch.randn(shape, generator=generator) * router_std, TARGET_ROUTER
    if leaf.startswith("shared_experts."):
        kind = TARGET_SHARED
    elif leaf.startswith("capacity_predictor."):
        kind = TARGET_PREDICTOR
    else:
        raise ValueError(f"{name}: the upcycling does not know how to initialise this MoE tensor")
    if leaf == "shared_experts.fc2.weight" or name.endswith(".bias"):
        return torch.zeros(shape), kind
    if len(shape) != 2:
        raise ValueError(f"{name}: the upcycling does not know how to initialise this MoE tensor")
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))  # Xavier-uniform, as DiT.initialize_weights
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound, kind


def _take(source: dict, name: str, shape: torch.Size) -> torch.Tensor:
    if name not in source:
        raise ValueError(f"the source has no tensor {name!r}")
    value = source[name]
    if value.shape != shape:
        raise ValueError(f"source tensor {name} has shape {tuple(value.shape)}, the target needs {tuple(shape)}")
    return value


def _check_pos_embed(pos_embed: torch.Tensor, config: DiTConfig) -> None:
    expected = sincos_2d(config.hidden_size, config.input_size // config.patch_size).unsqueeze(0)
    if pos_embed.shape != expected.shape or not torch.allclose(pos_embed.float(), expected, atol=1e-4):
        raise ValueError(f"the source's pos_embed {tuple(pos_embed.shape)} is not the 2-D sin-cos table ditmoe "
                         f"computes for the target {tuple(expected.shape)}")


def random_inputs(config: DiTConfig, samples: int = 2, seed: int = 0):
    """(x, t, y) of ``samples`` random inputs of ``config``'s model: latents, timesteps in [0, 1000), labels or
    captions (all tokens real)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, config.in_channels, config.input_size, config.input_size, generator=generator)
    t = torch.randint(0, 1000, (samples,), generator=generator)
    if config.is_text:
        tokens = torch.randn(samples, config.text_len, config.text_dim, generator=generator)
        return x, t, Caption(tokens, torch.ones(samples, config.text_len, dtype=torch.bool))
    return x, t, torch.randint(0, config.num_classes, (samples,), generator=generator)


@torch.no_grad()
def output_difference(source: dict[str, torch.Tensor], source_config: DiTConfig, target: dict[str, torch.Tensor],
                      target_config: DiTConfig, samples: int = 2, seed: int = 0) -> float:
    """max |MoE(x, t, y) - dense(x, t, y)| in fp32 over ``samples`` random inputs, both models in eval mode
    (no label dropout)."""
    dense = DiT(source_config).eval()  # its own pos_embed, as the MoE model's
    missing, unexpected = dense.load_state_dict({k: v for k, v in source.items() if k != POS_EMBED}, strict=False)
    if [k for k in missing if k != POS_EMBED] or unexpected:
        raise ValueError(f"source weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    moe = DiT(target_config).eval()
    moe.load_state_dict(target)
    x, t, y = random_inputs(source_config, samples, seed)
    keep = torch.zeros(samples, dtype=torch.bool)
    return (moe(x, t, y, keep) - dense(x, t, y, keep)).abs().max().item()

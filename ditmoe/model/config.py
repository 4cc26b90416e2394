"""Architecture configuration of DiT / DiT-MoE models."""

import math
from dataclasses import asdict, dataclass, fields, replace

ROUTINGS = ("token_choice", "expert_choice")
MOE_PLACEMENTS = ("all", "every_other", "deep_half")
EXPERT_ACTIVATIONS = ("swiglu", "gelu")
ROUTING_POOLS = ("sample", "group", "batch")


@dataclass(frozen=True)
class DiTConfig:
    """Every architecture and MoE hyper-parameter of a DiT(-MoE) model.

    ``num_experts == 0`` gives the dense DiT (GELU MLP of width ``mlp_ratio * hidden_size``).
    ``text_dim > 0`` gives a text-conditioned DiT (EC-DiT / PixArt-α blocks: self-attention, cross-attention
    to the caption tokens, feed-forward); it has no label embedder and ``num_classes`` is unused.
    """

    input_size: int = 32  #: Latent height = width.
    patch_size: int = 2  #: Side of the square patches the latent is cut into.
    in_channels: int = 4  #: Latent channels.
    hidden_size: int = 1152  #: Transformer width.
    depth: int = 28  #: Number of transformer blocks.
    num_heads: int = 16  #: Attention heads; divides hidden_size.
    mlp_ratio: float = 4.0  #: Dense MLP width / hidden_size.
    num_classes: int = 1000  #: Class labels (plus a null class when class_dropout_prob > 0); unused with text.
    class_dropout_prob: float = 0.1  #: Probability of training on the null class / null caption.
    learn_sigma: bool = True  #: Also predict the variance: out_channels = 2 * in_channels.
    qk_norm: bool = False  #: Per-head LayerNorm on queries and keys (official XL/G checkpoints).
    num_kv_heads: int = 0  #: Key/value heads of grouped-query attention (0: same as num_heads); divides num_heads.

    # Text conditioning (EC-DiT).
    text_dim: int = 0  #: Width of the text encoder's token embeddings (0: class-conditional model).
    text_len: int = 0  #: Caption tokens: the text encoder's max length, captions are padded to it (0 without text).
    pooled_text: bool = False  #: Add an MLP of the masked mean of the caption tokens to the adaLN input.

    # Mixture of experts.
    num_experts: int = 0  #: Routed experts per MoE layer (0: dense DiT).
    top_k: int = 2  #: Token choice: experts each token is routed to.
    routing: str = "token_choice"  #: 'token_choice' (tokens pick top_k experts) or 'expert_choice' (experts pick).
    capacity_factor: float = 2.0  #: Expert choice: each expert takes capacity_factor * T / E tokens.
    norm_topk_prob: bool = False  #: Token choice: renormalise the k routing weights to sum to 1.
    expert_ratio: float = 4.0  #: Expert hidden width / hidden_size.
    expert_activation: str = "swiglu"  #: Routed and shared experts: 'swiglu' (DiT-MoE) or 'gelu' (EC-DiT's GELU FFNs).
    num_shared_experts: int = 2  #: Shared experts, each an FFN of width shared_expert_ratio * hidden_size.
    shared_expert_ratio: float = 1.0  #: Shared expert hidden width / hidden_size.
    moe_placement: str = "all"  #: MoE blocks: 'all', 'every_other' (odd blocks) or 'deep_half' (the second half).
    balance_loss_alpha: float = 0.005  #: Token choice: weight of the load-balancing auxiliary loss (training only).
    # Expert-choice routing pools and DiffMoE's capacity predictor (docs/model.md explains the dependence of
    # 'group'/'batch' results on the other samples of a pool, and the predictor's training).
    routing_pool: str = "sample"  #: Expert choice picks top-C of: 'sample' (T tokens), 'group', 'batch' (micro-batch).
    routing_group_size: int = 0  #: routing_pool='group': tokens per group, a multiple of T (whole samples).
    capacity_predictor: bool = False  #: Expert choice: a per-layer predictor of the routing, used in eval mode.
    capacity_threshold: float = 0.5  #: Capacity predictor: sampling threshold in [0, 1]; higher, fewer assignments.
    capacity_predictor_weight: float = 1.0  #: Capacity predictor: weight of its loss in aux_loss (training only).

    def __post_init__(self):
        self._check_sizes()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} (latent size) is not divisible by patch_size={self.patch_size}"
            )
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is not one of {ROUTINGS}")
        if self.moe_placement not in MOE_PLACEMENTS:
            raise ValueError(f"moe_placement={self.moe_placement!r} is not one of {MOE_PLACEMENTS}")
        if self.num_experts and self.routing == "token_choice" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.num_experts and self.routing == "expert_choice" and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"expert_activation={self.expert_activation!r} is not one of {EXPERT_ACTIVATIONS}")
        self._check_attention_heads()
        self._check_text()
        self._check_routing_pool()
        self._check_capacity_predictor()

    def _check_attention_heads(self):
        if self.num_kv_heads < 0 or (self.num_kv_heads and self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must be 0 (same as num_heads) or divide "
                             f"num_heads={self.num_heads}")

    def _check_text(self):
        """text_dim and text_len are both set (text model) or both 0 (class model); pooled_text needs text."""
        for name in ("text_dim", "text_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.text_dim > 0) != (self.text_len > 0):
            raise ValueError(f"text_len={self.text_len} and text_dim={self.text_dim} must both be > 0 "
                             f"(text-conditioned model) or both 0 (class-conditional model)")
        if self.pooled_text and not self.text_dim:
            raise ValueError("pooled_text=True needs a text-conditioned model (text_dim > 0)")

    def _check_routing_pool(self):
        """routing_pool is known; its group size is whole samples; pools other than 'sample' need expert choice."""
        if self.routing_pool not in ROUTING_POOLS:
            raise ValueError(f"routing_pool={self.routing_pool!r} is not one of {ROUTING_POOLS}")
        if self.routing_pool == "group":
            size, tokens = self.routing_group_size, self.num_tokens
            if size <= 0 or size % tokens:
                raise ValueError(f"routing_group_size={size} must be a positive multiple of the {tokens} image "
                                 f"tokens of a sample (routing_pool='group' routes groups of whole samples)")
        elif self.routing_group_size != 0:
            raise ValueError(f"routing_group_size={self.routing_group_size} is only used with routing_pool='group' "
                             f"(routing_pool={self.routing_pool!r}); leave it 0")
        if self.num_experts and self.routing_pool != "sample" and self.routing != "expert_choice":
            raise ValueError(f"routing_pool={self.routing_pool!r} needs routing='expert_choice' "
                             f"(routing={self.routing!r} routes each token by itself)")

    def _check_capacity_predictor(self):
        """capacity_threshold in [0, 1], a non-negative loss weight; the predictor needs expert choice."""
        if not (math.isfinite(self.capacity_threshold) and 0 <= self.capacity_threshold <= 1):
            raise ValueError(f"capacity_threshold={self.capacity_threshold} must be in [0, 1]")
        if not (math.isfinite(self.capacity_predictor_weight) and self.capacity_predictor_weight >= 0):
            raise ValueError(f"capacity_predictor_weight={self.capacity_predictor_weight} must be >= 0")
        if self.num_experts and self.capacity_predictor and self.routing != "expert_choice":
            raise ValueError(f"capacity_predictor=True needs routing='expert_choice' (routing={self.routing!r})")

    def _check_sizes(self):
        """Sizes must be positive (experts and shared experts may be 0), before anything divides by them."""
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                     "mlp_ratio", "expert_ratio", "capacity_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("num_experts", "num_shared_experts", "shared_expert_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.class_dropout_prob <= 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_text(self) -> bool:
        """Text-conditioned (captions) rather than class-conditional (labels)."""
        return self.text_dim > 0

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the attention layers (num_kv_heads, or num_heads when 0)."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def expert_matrices(self) -> int:
        """(D, F) weight matrices per expert: 3 for SwiGLU (gate, up, down), 2 for GELU (up, down)."""
        return 3 if self.expert_activation == "swiglu" else 2

    @property
    def expert_hidden(self) -> int:
        return int(self.expert_ratio * self.hidden_size)

    @property
    def shared_hidden(self) -> int:
        """Width of the fused shared-expert FFN (sum of all shared experts)."""
        return int(self.num_shared_experts * self.shared_expert_ratio * self.hidden_size)

    def moe_in_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) uses an MoE FFN."""
        if not self.is_moe:
            return False
        if self.moe_placement == "every_other":
            return index % 2 == 1
        if self.moe_placement == "deep_half":
            return index >= self.depth // 2
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        """Config of a ``to_dict`` dict; keys added since it was written take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "DiTConfig":
        return replace(self, **changes)

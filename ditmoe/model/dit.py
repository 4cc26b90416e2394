"""DiT backbone with adaLN-Zero blocks whose feed-forward is dense or mixture-of-experts; class-conditional
(DiT, DiT-MoE) or text-conditioned with cross-attention to caption tokens (EC-DiT, PixArt-α blocks)."""

import torch
from torch import nn

from .attention import Attention, CrossAttention
from .conditioning import Caption, Condition
from .config import DiTConfig
from .embeddings import CaptionEmbedder, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from .mlp import GeluMLP
from .moe import MoEFeedForward


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Self-attention and feed-forward, each modulated and gated by the conditioning c (adaLN-Zero); text models
    add cross-attention to the caption between them, unmodulated as in PixArt-α. The feed-forward (and so the
    MoE router) sees only the image tokens, after cross-attention."""

    def __init__(self, config: DiTConfig, use_moe: bool):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.num_heads, qk_norm=config.qk_norm, num_kv_heads=config.kv_heads)
        self.cross_attn = None  # text models: CrossAttention
        if config.is_text:
            self.cross_attn = CrossAttention(d, config.num_heads, qk_norm=config.qk_norm, num_kv_heads=config.kv_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MoEFeedForward(config) if use_moe else GeluMLP(d, int(config.mlp_ratio * d))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, T, D) image tokens, c (N, D) conditioning; text models: context (N, L, D) projected caption
        tokens and context_mask (N, L) bool (plain tensors: blocks are checkpointed and compiled as they are)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            if context is None or context_mask is None:
                raise ValueError("a text-conditioned block needs context (N, L, D) and context_mask (N, L)")
            x = x + self.cross_attn(x, context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, config.patch_size**2 * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion transformer: ``forward(x, t, y)`` maps (N, C, H, W) latents, (N,) timesteps and the condition
    y to (N, C_out, H, W), C_out = 2C with learned σ. y: (N,) labels for class-conditional models, a
    :class:`Caption` for text-conditioned ones (``config.text_dim > 0``), whose ``y_embedder`` is then a
    :class:`CaptionEmbedder` instead of a :class:`LabelEmbedder`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        if config.is_text:
            self.y_embedder = CaptionEmbedder(config.text_dim, config.text_len, d, config.class_dropout_prob,
                                              pooled=config.pooled_text)
        else:
            self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        grid = config.input_size // config.patch_size
        self.register_buffer("pos_embed", sincos_2d(d, grid).unsqueeze(0))  # (1, T, D), fixed
        self.blocks = nn.ModuleList(DiTBlock(config, config.moe_in_block(i)) for i in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: Xavier linears, zeroed adaLN modulation and output layer; for text models
        (PixArt-α) also zeroed cross-attention output projections and the pooled-caption MLP like the
        timestep MLP."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.moe_layers():
            nn.init.kaiming_uniform_(module.gate.weight, a=5**0.5)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.is_text:
            self._initialize_caption_weights()
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _initialize_caption_weights(self):
        self.y_embedder.reset_null_caption()
        if self.y_embedder.pool is not None:
            nn.init.normal_(self.y_embedder.pool[0].weight, std=0.02)
            nn.init.normal_(self.y_embedder.pool[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE feed-forward of each MoE block: ours, or what replaced it (DeepSpeed AutoEP)."""
        return [block.mlp for i, block in enumerate(self.blocks) if self.config.moe_in_block(i)]

    def balance_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the balance losses of the last forward (0 for a dense model)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else self.pos_embed.new_zeros(())

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Condition,
                drop_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels or a Caption (text models);
        ``drop_labels`` (N,) bool replaces labels by the null class / captions by the null caption
        (classifier-free guidance training; drawn inside when None)."""
        self._check_inputs(x, y)
        x, c = self.embed(x, t)  # (N, T, D), (N, D)
        if not self.config.is_text:
            c = c + self.y_embedder(y, drop_labels)
            for block in self.blocks:
                x = block(x, c)
            return self.head(x, c)  # (N, C_out, H, W)
        context, mask, pooled = self.y_embedder(y, drop_labels)  # (N, L, D), (N, L), (N, D) or None
        if pooled is not None:
            c = c + pooled
        for block in self.blocks:
            x = block(x, c, context, mask)  # positional tensors: checkpoint wrappers pass *args only
        return self.head(x, c)  # (N, C_out, H, W)

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions (N, T, D) and the timestep embedding (N, D) of (N, C, H, W) latents and
        (N,) timesteps (a region of its own: compiled apart from the blocks)."""
        return self.x_embedder(x) + self.pos_embed.to(x.dtype), self.t_embedder(t)

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final adaLN layer and unpatchify: (N, T, D) tokens, (N, D) conditioning -> (N, C_out, H, W)."""
        return self.unpatchify(self.final_layer(x, c))

    def _check_inputs(self, x: torch.Tensor, y: Condition):
        """Latent shape and condition kind (labels or Caption) of the model; clear errors otherwise."""
        cfg = self.config
        if x.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the model's "
                f"(N, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size})"
            )
        if cfg.is_text != isinstance(y, Caption):
            expected = "a Caption(tokens, mask)" if cfg.is_text else "a tensor of (N,) class labels"
            kind = "text-conditioned (text_dim>0)" if cfg.is_text else "class-conditional (text_dim=0)"
            raise TypeError(f"this {kind} model expects y to be {expected}, got {type(y).__name__}")
        if cfg.is_text:
            self._check_caption(y, x.shape[0])

    def _check_caption(self, y: Caption, n: int):
        tokens, mask = y
        if tokens.dim() != 3 or tokens.shape[0] != n or tokens.shape[2] != self.config.text_dim:
            raise ValueError(f"caption tokens of shape {tuple(tokens.shape)} do not match "
                             f"(N={n}, L, text_dim={self.config.text_dim})")
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"caption mask of shape {tuple(mask.shape)} does not match its tokens' (N, L) = "
                             f"{tuple(tokens.shape[:2])}")

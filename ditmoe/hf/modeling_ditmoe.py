"""Hugging Face ``PreTrainedModel`` around ditmoe's DiT: ``model(x, t, y)`` returns the network
output (N, C_out, H, W) exactly as the training model does (same code, same weights).

Class-conditional models take ``y`` (N,) int64 labels. Text-conditioned models (``config.text_dim > 0``) take
the caption as ``y`` (a ``Caption`` or any ``(tokens, mask)`` pair: tokens (N, L, text_dim) float embeddings
of the text encoder named by ``config.text_encoder_name_or_path``, mask (N, L), True/1 on real tokens), or as
``encoder_hidden_states`` and ``encoder_attention_mask`` (all tokens real when no mask is given)."""

import torch
from transformers import PreTrainedModel

from ..model.conditioning import Caption
from ..model.dit import DiT
from .configuration_ditmoe import DiTMoEConfig


class DiTMoEModel(PreTrainedModel):
    config_class = DiTMoEConfig
    base_model_prefix = "dit"
    main_input_name = "x"
    _no_split_modules = ["DiTBlock"]

    def __init__(self, config: DiTMoEConfig):
        super().__init__(config)
        self.dit = DiT(config.to_dit_config())
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint; fresh models use DiT's own initialisation."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                drop_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y labels or caption (see the module docstring);
        ``drop_labels`` (N,) bool: use the null class / null caption (classifier-free guidance)."""
        return self.dit(x, t, self._condition(y, encoder_hidden_states, encoder_attention_mask),
                        drop_labels)  # (N, C_out, H, W)

    def _condition(self, y, tokens, mask):
        if not self.dit.config.is_text:
            if tokens is not None or mask is not None:
                raise ValueError("a class-conditional model takes labels y, not encoder_hidden_states")
            return y
        if y is not None and tokens is not None:
            raise ValueError("pass the caption either as y=(tokens, mask) or as encoder_hidden_states, not both")
        if y is not None:
            if isinstance(y, torch.Tensor) or not isinstance(y, (tuple, list)) or len(y) != 2:
                raise TypeError("a text-conditioned model takes y=(tokens (N, L, text_dim), mask (N, L)) or "
                                f"encoder_hidden_states, got {type(y).__name__}")
            tokens, mask = y
        if tokens is None:
            raise ValueError("a text-conditioned model needs the caption: y=(tokens, mask) or encoder_hidden_states")
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Caption(tokens, mask.to(tokens.device).bool())

"""Hugging Face ``PreTrainedModel`` around ditmoe's DiT: ``model(x, t, y)`` returns the network
output (N, C_out, H, W) exactly as the training model does (same code, same weights)."""

import torch
from transformers import PreTrainedModel

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

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)  # (N, C_out, H, W)

"""Hugging Face ``PretrainedConfig`` of a ditmoe model: every architecture and MoE hyper-parameter,
with the derived widths written out so that config.json alone describes the network.

Text-conditioned models (``text_dim > 0``) also name the frozen text encoder their captions come from:
``text_encoder_name_or_path`` (hub id or path, None when unknown) and ``text_max_length`` (tokens each
prompt is padded or truncated to; ``text_len`` when not given). The encoder is not part of the weights.

Models of VAE latents may name the VAE their training data was encoded with: ``vae_name_or_path`` (hub id or
path of a diffusers ``AutoencoderKL``, "identity" for models of pixels; None when unknown) and
``vae_scaling_factor`` (the latents are the VAE's latents times this). The VAE is not part of the weights."""

import math

from transformers import PretrainedConfig

from ..model.config import DiTConfig

# DiTConfig field -> config.json key, where transformers reserves the name (top_k is a generation option).
RENAMED = {"top_k": "num_experts_per_tok"}


class DiTMoEConfig(PretrainedConfig):
    model_type = "ditmoe"

    def __init__(self, expert_hidden_size: int | None = None, shared_expert_hidden_size: int | None = None,
                 text_encoder_name_or_path: str | None = None, text_max_length: int | None = None,
                 vae_name_or_path: str | None = None, vae_scaling_factor: float | None = None, **kwargs):
        arch = {name: kwargs.pop(RENAMED.get(name, name)) for name in DiTConfig.__dataclass_fields__
                if RENAMED.get(name, name) in kwargs}
        super().__init__(**kwargs)
        for name, value in DiTConfig(**arch).to_dict().items():
            setattr(self, RENAMED.get(name, name), value)
        dit = self.to_dit_config()
        derived = {"expert_hidden_size": dit.expert_hidden if dit.is_moe else 0,
                   "shared_expert_hidden_size": dit.shared_hidden if dit.is_moe else 0}
        for name, given in (("expert_hidden_size", expert_hidden_size),
                            ("shared_expert_hidden_size", shared_expert_hidden_size)):
            if given is not None and given != derived[name]:
                raise ValueError(f"config {name}={given} contradicts the other fields (they give {derived[name]})")
            setattr(self, name, derived[name])
        self.text_encoder_name_or_path, self.text_max_length = _text_encoder(dit, text_encoder_name_or_path,
                                                                             text_max_length)
        self.vae_name_or_path, self.vae_scaling_factor = _vae(vae_name_or_path, vae_scaling_factor)

    @classmethod
    def from_dit_config(cls, config: DiTConfig, **kwargs) -> "DiTMoEConfig":
        return cls(**{RENAMED.get(k, k): v for k, v in config.to_dict().items()}, **kwargs)

    def to_dit_config(self) -> DiTConfig:
        return DiTConfig(**{name: getattr(self, RENAMED.get(name, name)) for name in DiTConfig.__dataclass_fields__})


def _text_encoder(dit: DiTConfig, name, max_length) -> tuple[str | None, int | None]:
    """(text_encoder_name_or_path, text_max_length) checked against the architecture: only text models name an
    encoder; its max length is a positive integer, ``text_len`` by default."""
    if name is None:
        if max_length is not None:
            raise ValueError(f"config text_max_length={max_length!r} needs text_encoder_name_or_path")
        return None, None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"config text_encoder_name_or_path must be a non-empty string, got {name!r}")
    if not dit.is_text:
        raise ValueError(f"config text_encoder_name_or_path={name!r}: a class-conditional model (text_dim=0) "
                         "has no text encoder")
    if max_length is None:
        return name, dit.text_len
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"config text_max_length must be a positive integer, got {max_length!r}")
    return name, max_length


def _vae(name, scaling_factor) -> tuple[str | None, float | None]:
    """(vae_name_or_path, vae_scaling_factor) checked: a non-empty name and a positive finite factor, both or
    neither."""
    if name is None and scaling_factor is None:
        return None, None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"config vae_name_or_path must be a non-empty string, got {name!r}")
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
            or not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise ValueError(f"config vae_scaling_factor of vae {name!r} must be a positive number, got {scaling_factor!r}")
    return name, float(scaling_factor)

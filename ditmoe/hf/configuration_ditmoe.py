"""Hugging Face ``PretrainedConfig`` of a ditmoe model: every architecture and MoE hyper-parameter,
with the derived widths written out so that config.json alone describes the network."""

from transformers import PretrainedConfig

from ..model.config import DiTConfig

# DiTConfig field -> config.json key, where transformers reserves the name (top_k is a generation option).
RENAMED = {"top_k": "num_experts_per_tok"}


class DiTMoEConfig(PretrainedConfig):
    model_type = "ditmoe"

    def __init__(self, expert_hidden_size: int | None = None, shared_expert_hidden_size: int | None = None,
                 **kwargs):
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

    @classmethod
    def from_dit_config(cls, config: DiTConfig, **kwargs) -> "DiTMoEConfig":
        return cls(**{RENAMED.get(k, k): v for k, v in config.to_dict().items()}, **kwargs)

    def to_dit_config(self) -> DiTConfig:
        return DiTConfig(**{name: getattr(self, RENAMED.get(name, name)) for name in DiTConfig.__dataclass_fields__})

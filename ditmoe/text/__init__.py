"""Frozen text encoders for text-conditioned (EC-DiT) training: prompts -> ``Caption``."""

from .encoder import TextEncoder
from .tiny import build_tiny_text_encoder

__all__ = ["TextEncoder", "build_tiny_text_encoder"]

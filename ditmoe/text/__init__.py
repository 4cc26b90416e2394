"""Frozen text encoders for text-conditioned (EC-DiT) training: prompts -> ``Caption``."""

from .encoder import TextEncoder
from .pretrained import PRETRAINED, PretrainedFileError, resolve_pretrained
from .tiny import build_tiny_text_encoder

__all__ = ["PRETRAINED", "PretrainedFileError", "TextEncoder", "build_tiny_text_encoder", "resolve_pretrained"]

"""Hugging Face (transformers) format: export of trained models and import of published ones."""

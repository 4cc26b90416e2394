"""Everything distributed: process-group setup and the DeepSpeed engine around single-device models."""

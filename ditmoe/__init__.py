"""ditmoe: training system for sparse Mixture-of-Experts diffusion transformers."""

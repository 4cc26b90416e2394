"""Weight-name adapters: one module per foreign state-dict layout, each with ``to_ditmoe(state) -> state``
and ``from_ditmoe(state) -> state``. They rename, stack and split tensors; they build no model.

- ``autoep``: DeepSpeed AutoEP's expert-parallel module names.
- ``official_ditmoe``: feizc/DiT-MoE's published ``.pt`` files (per-expert SwiGLU under ``moe.``).
- ``dit``: facebookresearch/DiT's published ``.pt`` files (dense ``mlp.fc1``/``mlp.fc2``).
- ``hf``: the Hugging Face export, ditmoe's names under ``DiTMoEModel``'s ``dit.`` submodule.
"""

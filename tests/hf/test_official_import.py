"""``--from official-ditmoe|dit``: published checkpoints in feizc/DiT-MoE's and facebookresearch/DiT's
key layouts (state dicts built here to those layouts and shapes; no downloads) become ditmoe models.

The layouts, as their ``models.py`` define them: DiT-MoE blocks hold ``moe.gate.weight`` (E, D),
``moe.experts.{j}.{gate,up,down}_proj.weight`` (per-expert SwiGLU, no bias) and
``moe.shared_experts.*``; timm attention ``attn.qkv``/``attn.proj``, or the flash layout
``attn.Wqkv``, per-head LayerNorms ``attn.q_norm``/``attn.k_norm`` and ``attn.out_proj``; DiT blocks
hold ``mlp.fc1``/``mlp.fc2``. ``pos_embed`` is MAE's 2-D sin-cos table, stored in the checkpoint.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditmoe.hf.official import infer_config
from ditmoe.inference import load_model
from ditmoe.model import DiT, get_preset
from ditmoe.weights import official_ditmoe

from conftest import load_tool, run_cli

TOOL = "tools/convert_ckpt_to_hf.py"


class Planted:
    """An object no loader allows (DeepSpeed allows argparse.Namespace in torch's safe loader process-wide)."""


def mae_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's table: meshgrid(w, h), the first half of the channels from grid[0] (sin then cos)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)[None]


def random_model(config) -> DiT:
    torch.manual_seed(0)
    model = DiT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2 if "norm" in name else 0.05)
    return model


def official_layout(model: DiT, flash: bool) -> dict[str, torch.Tensor]:
    """The model's weights under the official DiT-MoE (or, without experts, DiT) key names."""
    cfg = model.config
    out = {"pos_embed": torch.from_numpy(mae_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)).float()}
    for name, value in model.state_dict().items():
        if name == "pos_embed":
            continue
        parts = name.split(".")
        if parts[0] != "blocks" or parts[2] not in ("attn", "mlp"):
            out[name] = value.clone()
        elif parts[2] == "attn":
            layer = {"qkv": "Wqkv", "proj": "out_proj"}.get(parts[3], parts[3]) if flash else parts[3]
            out[".".join([*parts[:3], layer, *parts[4:]])] = value.clone()
        elif not cfg.is_moe:
            out[name] = value.clone()
        elif parts[3] == "experts":
            continue
        else:
            out[".".join([parts[0], parts[1], "moe", *parts[3:]])] = value.clone()
    for i in range(cfg.depth if cfg.is_moe else 0):
        gate_up = model.state_dict()[f"blocks.{i}.mlp.experts.gate_up_proj"]
        down = model.state_dict()[f"blocks.{i}.mlp.experts.down_proj"]
        f = gate_up.shape[1] // 2
        for j in range(cfg.num_experts):
            out[f"blocks.{i}.moe.experts.{j}.gate_proj.weight"] = gate_up[j, :f].clone()
            out[f"blocks.{i}.moe.experts.{j}.up_proj.weight"] = gate_up[j, f:].clone()
            out[f"blocks.{i}.moe.experts.{j}.down_proj.weight"] = down[j].clone()
    return out


def official_moe(state: dict, prefix: str, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """DiT-MoE's SparseMoeBlock at inference, written from its definition: softmax gate, top-k
    weights (not renormalised), per-expert SwiGLU, plus the shared experts. x: (T, D)."""
    def swiglu(p, h):
        return F.linear(F.silu(F.linear(h, state[f"{p}.gate_proj.weight"])) * F.linear(h, state[f"{p}.up_proj.weight"]),
                        state[f"{p}.down_proj.weight"])

    scores = F.linear(x, state[f"{prefix}.gate.weight"]).softmax(-1)
    weights, experts = scores.topk(top_k, dim=-1)
    y = torch.zeros_like(x)
    for token in range(len(x)):
        for w, e in zip(weights[token], experts[token]):
            y[token] += w * swiglu(f"{prefix}.experts.{e}", x[token:token + 1])[0]
    return y + swiglu(f"{prefix}.shared_experts", x)


def flash_attention(state: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The flash-layout attention: Wqkv -> (3, H, hd), per-head LayerNorm of q and k, softmax(qkᵀ/√hd)v."""
    t, d = x.shape
    hd = d // heads
    q, k, v = F.linear(x, state[f"{prefix}.Wqkv.weight"], state[f"{prefix}.Wqkv.bias"]).view(t, 3, heads, hd).unbind(1)
    q = F.layer_norm(q, (hd,), state[f"{prefix}.q_norm.weight"], state[f"{prefix}.q_norm.bias"], eps=1e-6)
    k = F.layer_norm(k, (hd,), state[f"{prefix}.k_norm.weight"], state[f"{prefix}.k_norm.bias"], eps=1e-6)
    attn = (torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)).softmax(-1)
    out = torch.einsum("hts,shd->thd", attn, v).reshape(t, d)
    return F.linear(out, state[f"{prefix}.out_proj.weight"], state[f"{prefix}.out_proj.bias"])


@pytest.fixture(scope="module")
def flash_checkpoint(tmp_path_factory):
    """An official XL/G-style checkpoint (flash layout, q/k norm) of a tiny DiT-MoE, saved as {"ema": ...}."""
    model = random_model(get_preset("tiny").replace(qk_norm=True))
    state = official_layout(model, flash=True)
    path = tmp_path_factory.mktemp("official") / "dit_moe_tiny.pt"
    torch.save({"ema": state}, path)
    return model, state, path


def test_conversion_follows_the_official_semantics(flash_checkpoint):
    _, state, _ = flash_checkpoint
    config = infer_config(state, "official-ditmoe")
    assert (config.num_experts, config.top_k, config.qk_norm, config.num_heads) == (4, 2, True, 2)
    assert (config.expert_hidden, config.shared_hidden, config.depth, config.in_channels) == (128, 64, 2, 4)
    model = DiT(config).eval()
    model.load_state_dict(official_ditmoe.to_ditmoe(state), strict=False)
    x = torch.randn(16, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1].mlp(x[None])[0], official_moe(state, "blocks.1.moe", x, 2),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.blocks[0].attn(x[None])[0], flash_attention(state, "blocks.0.attn", x, 2),
                                   rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.pos_embed, state["pos_embed"], atol=1e-6)  # MAE's table = ours


@pytest.mark.slow
def test_official_ditmoe_to_hf_and_sampling(flash_checkpoint, tmp_path):
    original, _, path = flash_checkpoint
    out = tmp_path / "hf"
    proc = run_cli([TOOL, "--from", "official-ditmoe", "--ckpt", str(path), "--out", str(out)])
    assert "rectified_flow" in proc.stdout
    assert json.loads((out / "scheduler_config.json").read_text())["objective"] == "rectified_flow"
    imported, meta = load_model(out)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 5, 10])
    with torch.no_grad():
        assert torch.equal(imported(x, t, y), original(x, t, y))
    samples = tmp_path / "s.npz"
    # a published checkpoint records no VAE: its raw latents, asked for by name (without it: a clear error)
    run_cli(["tools/sample.py", "--ckpt", str(out), "--out", str(samples), "--num-samples", "4", "--steps", "3",
             "--cfg-scale", "2.0", "--vae", "identity"])
    arrays = np.load(samples)
    assert arrays["arr_0"].shape == (4, 8, 8, 4) and arrays["arr_0"].dtype == np.uint8


@pytest.mark.slow
def test_facebook_dit_dense_checkpoint(tmp_path):
    original = random_model(get_preset("tiny").replace(num_experts=0))
    state = official_layout(original, flash=False)
    assert "blocks.0.mlp.fc1.weight" in state and "blocks.0.attn.qkv.weight" in state
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    proc = run_cli([TOOL, "--from", "dit", "--ckpt", str(path), "--out", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0 and "pass --num-heads" in proc.stderr
    run_cli([TOOL, "--from", "dit", "--ckpt", str(path), "--num-heads", "2", "--out", str(tmp_path / "hf")])
    imported, meta = load_model(tmp_path / "hf")
    assert meta["train_config"]["objective"] == "ddpm" and imported.config.num_experts == 0
    assert imported.config.mlp_ratio == 4.0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(imported(x, t, y), original(x, t, y))


def test_published_checkpoint_errors(flash_checkpoint, tmp_path):
    _, state, _ = flash_checkpoint
    tool = load_tool("convert_ckpt_to_hf")
    cases = {
        "unexpected keys for this architecture: ['blocks.0.moe.extra.weight']":
            {**state, "blocks.0.moe.extra.weight": torch.zeros(1)},
        "missing key 'blocks.1.moe.experts.3.up_proj.weight'":
            {k: v for k, v in state.items() if k != "blocks.1.moe.experts.3.up_proj.weight"},
        "no DiT state dict in it (missing 'x_embedder.proj.weight')": {"something": torch.zeros(1)},
    }
    for message, broken in cases.items():
        path = tmp_path / "broken.pt"
        torch.save(broken, path)
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--from", "official-ditmoe", "--ckpt", str(path), "--out", str(tmp_path / "o")])
        assert message in str(exit_info.value.code)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--from", "dit", "--ckpt", str(garbage), "--out", str(tmp_path / "o")])
    assert f"checkpoint file {garbage} is truncated or corrupt" in str(exit_info.value.code)
    planted = tmp_path / "planted.pt"
    torch.save({"x_embedder.proj.weight": Planted()}, planted)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--from", "dit", "--ckpt", str(planted), "--out", str(tmp_path / "o")])
    message = str(exit_info.value.code)
    assert f"checkpoint file {planted}: ditmoe refuses to unpickle non-tensor type {__name__}.Planted" in message
    assert "weights_only" not in message  # not torch's advice to load it anyway
    assert not (tmp_path / "o").exists()

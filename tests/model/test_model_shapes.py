"""Forward shapes, adaLN-Zero initialisation, positional table and MoE placement of DiT(-MoE)."""

import numpy as np
import pytest
import torch

from ditmoe.model import DiT, get_preset
from ditmoe.model.embeddings import sincos_2d
from ditmoe.model.moe import MoEFeedForward


@pytest.mark.parametrize("name", ["tiny", "tiny-ec", "demo"])
def test_forward_shape_learned_sigma(name):
    cfg = get_preset(name)
    model = DiT(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)


def test_fixed_sigma_and_dense_variants():
    cfg = get_preset("tiny").replace(learn_sigma=False, num_experts=0)
    model = DiT(cfg)
    assert not model.moe_layers()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.shape == (2, 4, 8, 8)
    assert model.balance_loss().item() == 0.0


def test_zero_initialised_output_and_modulation():
    model = DiT(get_preset("tiny"))
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


def test_positional_table_matches_mae_layout():
    """Reference: MAE/DiT build the grid with meshgrid(w, h) and put the column code first."""
    dim, grid = 16, 4
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    np.testing.assert_allclose(sincos_2d(dim, grid).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("placement,expected", [("all", [0, 1, 2, 3]), ("every_other", [1, 3]), ("deep_half", [2, 3])])
def test_moe_placement(placement, expected):
    cfg = get_preset("tiny").replace(depth=4, moe_placement=placement)
    model = DiT(cfg)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEFeedForward)] == expected


def test_label_dropout_uses_null_class_only_in_training():
    model = DiT(get_preset("tiny").replace(class_dropout_prob=1.0))
    emb = model.y_embedder
    labels = torch.tensor([1, 2, 3])
    null = emb.embedding_table.weight[emb.num_classes]
    emb.train()
    assert torch.equal(emb(labels), null.expand(3, -1))
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table.weight[labels])


def test_mismatched_input_shape_is_a_clear_error():
    model = DiT(get_preset("tiny"))
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2]))

"""The paper's Table 1 (parameters, GFLOPs) and the FLOP accounting against a measured forward."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditmoe.model import DiT, get_preset
from ditmoe.model.card import attention_macs, linear_macs, model_card

from conftest import run_cli

# Exact totals/activated of this architecture (paper truncates) and the paper's GFLOPs.
TABLE1 = {
    "DiT-MoE-S/2-8E2A": (199.31, 71.91, 15.43),
    "DiT-MoE-S/2-16E2A": (369.21, 71.94, 15.44),
    "DiT-MoE-B/2-8E2A": (795.86, 286.25, 61.68),
    "DiT-MoE-L/2-8E2A": (2823.76, 1011.82, 219.26),
    "DiT-MoE-XL/2-8E2A": (4168.16, 1492.72, 323.74),
    "DiT-MoE-G/2-16E2A": (16503.72, 3181.56, 690.94),
}


@pytest.mark.parametrize("name", list(TABLE1))
def test_table1(name):
    total, activated, gflops = TABLE1[name]
    card = model_card(get_preset(name))
    assert card["params_total_M"] == pytest.approx(total, rel=1e-3)
    assert card["params_activated_M"] == pytest.approx(activated, rel=1e-3)
    assert card["gflops_paper"] == pytest.approx(gflops, rel=0.03)
    assert card["gflops_full"] > 2 * card["gflops_paper"]


def test_dense_dit_xl_matches_dit_paper():
    card = model_card(get_preset("DiT-XL/2"))
    assert card["params_total_M"] == pytest.approx(675.13, rel=1e-3)
    assert card["params_activated_M"] == card["params_total_M"]


@pytest.mark.parametrize("name", ["tiny", "tiny-ec", "demo"])
def test_flop_accounting_matches_measured_forward(name):
    cfg = get_preset(name).replace(num_heads=1) if name == "tiny-ec" else get_preset(name)
    model = DiT(cfg).eval()
    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA: counted bmm
        model(x, torch.tensor([3]), torch.tensor([1]))
    assert counter.get_total_flops() == pytest.approx(2 * (linear_macs(cfg) + attention_macs(cfg)), rel=1e-6)


def test_model_card_cli_json():
    out = run_cli(["tools/model_card.py", "--preset", "DiT-MoE-S/2-8E2A", "--json"]).stdout
    card = json.loads(out)
    assert card["params_total_M"] == pytest.approx(199.31, rel=1e-3)
    assert card["config"]["num_experts"] == 8


def test_model_card_cli_text_preset_lists_the_encoder_apart():
    out = run_cli(["tools/model_card.py", "--preset", "EC-DiT-XL-8E", "--json"]).stdout
    card = json.loads(out)
    assert card["text_encoder"] == "T5-v1.1-XXL encoder, 4.76B parameters"
    assert card["text_tokens"] == 120 and card["config"]["text_dim"] == 4096
    assert card["params_total_M"] < card["text_encoder_params_M"]  # the encoder is not in the model's total


def test_model_card_cli_unknown_preset():
    res = run_cli(["tools/model_card.py", "--preset", "DiT-MoE-Q/2"], check=False)
    assert res.returncode != 0 and "unknown preset 'DiT-MoE-Q/2'" in res.stderr

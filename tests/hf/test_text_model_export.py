"""Hugging Face export of text-conditioned models (EC-DiT): config.json carries every text and attention field
and names the text encoder, the remote code takes captions (AutoModel offline, in a process that cannot import
ditmoe), and the folder loads back through ``load_model`` / ``load_hf_folder`` with the original's outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ditmoe.inference import load_model
from ditmoe.model import DiT, get_preset
from ditmoe.model.conditioning import Caption

from conftest import load_tool

ENCODER = "google/t5-v1_1-xxl"
TEXT_FIELDS = ("text_dim", "text_len", "num_kv_heads", "expert_activation", "pooled_text")
# Loads the folder with transformers only (cwd outside the repository, no PYTHONPATH); the caption goes in
# as a plain (tokens, mask) pair, as encoder_hidden_states, and dropped to the null caption.
AUTOMODEL_SCRIPT = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x, t, tokens, mask = torch.load(sys.argv[2])
with torch.no_grad():
    outs = [model(x, t, (tokens, mask)),
            model(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask.long()),
            model(x, t, (tokens, mask), drop_labels=torch.tensor([True, False, True]))]
torch.save(outs, sys.argv[3])
print(type(model).__name__, any(name.split(".")[0] == "ditmoe" for name in sys.modules))
"""


def export(*args, **kwargs):
    """``ditmoe.hf.export.export``, imported at the first call (ditmoe.hf imports transformers)."""
    from ditmoe.hf.export import export

    return export(*args, **kwargs)


def load_hf_folder(folder):
    from ditmoe.hf.load import load_hf_folder

    return load_hf_folder(folder)


def random_model(config) -> DiT:
    """Random weights everywhere (the zero-initialised output and cross-attention projections would hide
    wrong weights)."""
    torch.manual_seed(0)
    model = DiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def random_inputs(config, n=3):
    """Latents, timesteps and a random Caption whose masks have padding (one caption shorter than text_len)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.rand(n, generator=g)
    length = config.text_len - 2
    tokens = torch.randn(n, length, config.text_dim, generator=g)
    mask = torch.arange(length)[None] < torch.tensor([length, 3, 1])[:, None]
    return x, t, Caption(tokens * mask[..., None], mask)


# EC-DiT-tiny: GELU experts, expert choice, grouped-query attention (4 heads, 2 kv heads), no shared experts;
# the second: SwiGLU token-choice experts with shared experts, pooled caption, q/k norm, in every block.
CONFIGS = {
    "ec-dit-tiny": get_preset("EC-DiT-tiny"),
    "swiglu-pooled": get_preset("EC-DiT-tiny").replace(
        expert_activation="swiglu", routing="token_choice", top_k=2, num_shared_experts=1, pooled_text=True,
        qk_norm=True, moe_placement="all", num_kv_heads=1, learn_sigma=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    model = random_model(CONFIGS[request.param])
    out = tmp_path_factory.mktemp("hf_text") / request.param
    export(model, out, objective="rectified_flow", text_encoder=ENCODER, text_max_length=12)
    return model, out


def test_config_carries_the_text_fields_and_the_encoder(exported):
    from ditmoe.hf.configuration_ditmoe import DiTMoEConfig

    model, out = exported
    config = json.loads((out / "config.json").read_text())
    for name in TEXT_FIELDS:
        assert config[name] == getattr(model.config, name), name
    assert (config["text_encoder_name_or_path"], config["text_max_length"]) == (ENCODER, 12)
    hf_config = DiTMoEConfig.from_json_file(out / "config.json")
    assert hf_config.to_dit_config() == model.config
    assert (hf_config.text_encoder_name_or_path, hf_config.text_max_length) == (ENCODER, 12)


@pytest.mark.slow
def test_loads_back_with_the_same_outputs(exported):
    model, out = exported
    x, t, caption = random_inputs(model.config)
    with torch.no_grad():
        reference = model(x, t, caption)
        dropped = model(x, t, caption, drop_labels=torch.tensor([False, True, True]))
    for loaded, meta in (load_model(out), load_hf_folder(out)):
        assert loaded.config == model.config and not loaded.training
        assert meta["train_config"]["objective"] == "rectified_flow"
        assert meta["text_encoder"] == {"name": ENCODER, "max_length": 12}
        assert (meta["train_config"]["text_encoder"], meta["train_config"]["text_max_length"]) == (ENCODER, 12)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t, caption), reference, rtol=0, atol=1e-6)
            torch.testing.assert_close(loaded(x, t, caption, drop_labels=torch.tensor([False, True, True])),
                                       dropped, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_automodel_remote_code_takes_captions_offline(exported, tmp_path):
    model, out = exported
    x, t, caption = random_inputs(model.config)
    torch.save((x, t, caption.tokens, caption.mask), tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(AUTOMODEL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "load.py", str(out), "inputs.pt", "out.pt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "DiTMoEModel False"
    plain, keywords, dropped = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        reference = model(x, t, caption)
        reference_dropped = model(x, t, caption, drop_labels=torch.tensor([True, False, True]))
    torch.testing.assert_close(plain, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(keywords, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped, reference_dropped, rtol=0, atol=1e-6)


def test_model_card_describes_the_text_model(exported):
    model, out = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-to-image" in card and "- text-to-image" in card
    assert "cross-attention to the caption tokens" in card and "caption" in card.lower()
    assert f"`{ENCODER}`" in card and "12 tokens" in card
    assert "classes" not in card and "class-conditional" not in card
    assert f"(1, {model.config.text_len}, {model.config.text_dim})" in card
    if model.config.expert_activation == "gelu":
        assert "SwiGLU" not in card and "GELU width 128" in card and "4 GELU experts" in card
        assert "2 key/value heads: grouped-query attention" in card and "| shared experts | none |" in card
    else:
        assert "SwiGLU width 128" in card and "1, total SwiGLU width 32" in card
        assert "masked mean of the projected caption" in card


def test_class_model_card_is_unchanged_in_substance(tmp_path):
    export(random_model(get_preset("tiny")), tmp_path / "c", objective="ddpm")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "pipeline_tag: unconditional-image-generation" in card and "- class-conditional" in card
    assert "10 classes" in card and "SwiGLU width 128" in card and "cross-attention" not in card
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["text_encoder_name_or_path"] is None and config["text_max_length"] is None
    assert "text_encoder" not in load_hf_folder(tmp_path / "c")[1]


def test_text_encoder_is_optional(tmp_path):
    model = random_model(get_preset("EC-DiT-tiny"))
    export(model, tmp_path / "a", objective="ddpm")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["text_encoder_name_or_path"] is None and config["text_max_length"] is None
    assert "not recorded" in (tmp_path / "a" / "README.md").read_text()
    loaded, meta = load_model(tmp_path / "a")
    assert "text_encoder" not in meta and "text_encoder" not in meta["train_config"]
    export(model, tmp_path / "b", objective="ddpm", text_encoder="/models/t5")  # max length: text_len
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["text_encoder_name_or_path"], config["text_max_length"]) == ("/models/t5", 8)


@pytest.mark.parametrize("preset, kwargs, message", [
    ("tiny", {"text_encoder": ENCODER}, "class-conditional model .* has no text encoder"),
    ("EC-DiT-tiny", {"text_max_length": 8}, "text_max_length=8 needs text_encoder_name_or_path"),
    ("EC-DiT-tiny", {"text_encoder": ENCODER, "text_max_length": 0}, "must be a positive integer"),
    ("EC-DiT-tiny", {"text_encoder": " "}, "must be a non-empty string"),
])
def test_bad_text_encoder_arguments_write_nothing(tmp_path, preset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export(DiT(get_preset(preset)), tmp_path / "o", objective="ddpm", **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("meta, expected", [
    ({"train_config": {"objective": "ddpm"}}, (None, None)),
    ({"train_config": {"text_encoder": None}}, (None, None)),
    ({"train_config": {"text_encoder": "t5-small"}}, ("t5-small", None)),
    ({"train_config": {"text_encoder": "t5-small", "text_max_length": 20}}, ("t5-small", 20)),
    ({"train_config": {"text_encoder": {"name": "clip", "max_length": 77, "width": 16}}}, ("clip", 77)),
    ({"text_encoder": {"name": "t5", "max_length": 9}, "train_config": {"text_encoder": "other"}}, ("t5", 9)),
])
def test_converter_reads_the_recorded_text_encoder(meta, expected):
    assert load_tool("convert_ckpt_to_hf").recorded_text_encoder(meta) == expected


@pytest.mark.slow
def test_converter_passes_the_recorded_text_encoder(tmp_path, monkeypatch):
    tool = load_tool("convert_ckpt_to_hf")
    model = random_model(get_preset("EC-DiT-tiny"))
    meta = {"model_config": model.config.to_dict(),
            "train_config": {"objective": "rectified_flow", "text_encoder": "runs/t5", "text_max_length": 10}}
    monkeypatch.setattr(tool, "load_model", lambda ckpt, weights, tag: (model, meta))
    tool.main(["--ckpt", "run", "--out", str(tmp_path / "a")])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["text_encoder_name_or_path"], config["text_max_length"]) == ("runs/t5", 10)
    tool.main(["--ckpt", "run", "--out", str(tmp_path / "b"), "--text-encoder", "other", "--text-max-length", "6"])
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["text_encoder_name_or_path"], config["text_max_length"]) == ("other", 6)
    meta["train_config"] = {"objective": "rectified_flow"}  # an older run: nothing recorded
    tool.main(["--ckpt", "run", "--out", str(tmp_path / "c")])
    assert json.loads((tmp_path / "c" / "config.json").read_text())["text_encoder_name_or_path"] is None
    # a re-export of an exported folder keeps its encoder
    monkeypatch.undo()
    tool.main(["--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "d")])
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (config["text_encoder_name_or_path"], config["text_max_length"]) == ("runs/t5", 10)
    x, t, caption = random_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "d")[0](x, t, caption), model(x, t, caption))


def test_converter_refuses_a_text_encoder_for_a_class_model(tmp_path, monkeypatch):
    tool = load_tool("convert_ckpt_to_hf")
    model = DiT(get_preset("tiny"))
    monkeypatch.setattr(tool, "load_model", lambda ckpt, weights, tag: (model, {"train_config": {
        "objective": "ddpm", "text_encoder": "t5"}}))
    tool.main(["--ckpt", "run", "--out", str(tmp_path / "a")])  # a recorded encoder of a class model: ignored
    assert json.loads((tmp_path / "a" / "config.json").read_text())["text_encoder_name_or_path"] is None
    with pytest.raises(SystemExit, match="the checkpoint is a class-conditional model"):
        tool.main(["--ckpt", "run", "--out", str(tmp_path / "b"), "--text-encoder", "t5"])
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_caption_argument_errors(exported):
    from ditmoe.hf.modeling_ditmoe import DiTMoEModel

    _, out = exported
    model = DiTMoEModel.from_pretrained(out).eval()
    x, t, caption = random_inputs(model.dit.config)
    with pytest.raises(TypeError, match=r"takes y=\(tokens"):
        model(x, t, caption.tokens)
    with pytest.raises(ValueError, match="needs the caption"):
        model(x, t)
    with pytest.raises(ValueError, match="not both"):
        model(x, t, tuple(caption), encoder_hidden_states=caption.tokens)
    with torch.no_grad():  # no mask: every token is real
        full = Caption(caption.tokens, torch.ones(caption.mask.shape, dtype=torch.bool))
        assert torch.equal(model(x, t, encoder_hidden_states=caption.tokens), model.dit(x, t, full))


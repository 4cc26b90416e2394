"""Frozen text encoders: tiny T5 and CLIP encoders built without downloads, loaded offline, padded exactly."""

import time

import pytest
import torch

from ditmoe.data.digit_captions import caption_words
from ditmoe.model.conditioning import Caption
from ditmoe.text import TextEncoder, build_tiny_text_encoder
from ditmoe.text.tiny import WORDS

KINDS = ["t5", "clip"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """kind -> directory of a tiny encoder of width 16."""
    root = tmp_path_factory.mktemp("text")
    return {kind: build_tiny_text_encoder(root / kind, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_encoder_loads_offline_frozen(encoders, kind):
    from transformers import CLIPTextModel, T5EncoderModel

    encoder = TextEncoder.load(encoders[kind], 16)
    assert isinstance(encoder.model, {"t5": T5EncoderModel, "clip": CLIPTextModel}[kind])
    assert encoder.width == 16 and encoder.max_length == 16
    assert encoder.describe() == {"name": str(encoders[kind]), "max_length": 16, "width": 16}
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    caption = encoder.encode(["the digit 3"])
    assert not caption.tokens.requires_grad


@pytest.mark.parametrize("kind, lengths", [("t5", [2, 20, 24]), ("clip", [3, 5, 24])])
def test_prompts_are_padded_to_max_length(encoders, kind, lengths):
    """T5 (bytes): one token per byte + </s>; CLIP: a token per word + start and end; truncated at 24."""
    encoder = TextEncoder.load(encoders[kind], 24)
    long = "an image of the digit seven written in black on white with a pen and a ruler " * 2
    caption = encoder.encode(["3", "a handwritten three", long])
    assert isinstance(caption, Caption)
    assert caption.tokens.shape == (3, 24, 16) and caption.tokens.dtype == torch.float32
    assert caption.mask.shape == (3, 24) and caption.mask.dtype == torch.bool
    assert caption.mask.sum(1).tolist() == lengths
    assert torch.equal(caption.mask, torch.arange(24) < torch.tensor(lengths)[:, None])
    ids = encoder.tokenizer([long], padding="max_length", truncation=True, max_length=24)["input_ids"][0]
    assert ids[-1] == encoder.tokenizer.eos_token_id  # truncation keeps the end token
    assert (caption.tokens[~caption.mask] == 0).all() and (caption.tokens[caption.mask].abs().sum(-1) > 0).all()
    assert torch.isfinite(caption.tokens).all()


@pytest.mark.parametrize("kind", KINDS)
def test_same_prompt_same_embedding(encoders, kind):
    encoder = TextEncoder.load(encoders[kind], 24)
    a = encoder.encode(["the number 5", "a handwritten five"])
    b = encoder.encode(["a handwritten five", "zero", "the number 5"], batch_size=2)
    assert torch.allclose(a.tokens[0], b.tokens[2], atol=1e-6) and torch.allclose(a.tokens[1], b.tokens[0], atol=1e-6)
    again = TextEncoder.load(encoders[kind], 24).encode(["the number 5"])
    assert torch.equal(again.tokens[0], a.tokens[0])
    assert not torch.allclose(a.tokens[0], b.tokens[1])


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_real_tokens(encoders, kind):
    """True for both: T5's encoder masks padded keys, CLIP's text model is causal (and masks them too)."""
    short, long = TextEncoder.load(encoders[kind], 32), TextEncoder.load(encoders[kind], 64)
    prompts = ["the digit 3", "an image of the digit eight"]
    a, b = short.encode(prompts), long.encode(prompts)
    for i in range(len(prompts)):
        n = int(a.mask[i].sum())
        assert n == int(b.mask[i].sum()) < 32
        torch.testing.assert_close(a.tokens[i, :n], b.tokens[i, :n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_deterministic_and_leaves_the_rng_alone(tmp_path, kind):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    start = time.perf_counter()
    paths = [build_tiny_text_encoder(tmp_path / f"{kind}{i}", kind, seed=seed) for i, seed in enumerate([0, 0, 1])]
    seconds = (time.perf_counter() - start) / 3
    assert torch.equal(torch.rand(3), expected)
    states = [TextEncoder.load(p, 8).model.state_dict() for p in paths]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert seconds < 5  # about 0.05 s once transformers is imported; generous for a shared CPU


def test_clip_tokenizer_keeps_caption_words_whole(encoders):
    tokenizer = TextEncoder.load(encoders["clip"], 8).tokenizer
    assert set(caption_words()) <= set(WORDS)
    for word in WORDS:
        assert len(tokenizer(word)["input_ids"]) == 3, word  # <|startoftext|> word <|endoftext|>
    assert tokenizer("Zebra!")["input_ids"][1:-1]  # unknown words fall back to smaller pieces


def test_empty_and_bad_prompt_lists(encoders):
    encoder = TextEncoder.load(encoders["t5"], 8)
    empty = encoder.encode([])
    assert empty.tokens.shape == (0, 8, 16) and empty.mask.shape == (0, 8)
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("the digit 3")
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode([3])


def test_load_errors_name_the_encoder(encoders, tmp_path):
    with pytest.raises(OSError, match=f"text encoder '{tmp_path / 'missing'}': no such directory"):
        TextEncoder.load(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=f"text encoder '{tmp_path / 'empty'}': cannot load"):
        TextEncoder.load(tmp_path / "empty", 8)
    with pytest.raises(OSError, match="text encoder 'nobody/no-such-encoder': cannot load .* \\(offline\\)"):
        TextEncoder.load("nobody/no-such-encoder", 8)
    with pytest.raises(ValueError, match="max_length 100 exceeds its max_position_embeddings 77"):
        TextEncoder.load(encoders["clip"], 100)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        TextEncoder.load(encoders["t5"], 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_tiny_text_encoder(tmp_path / "x", "bert")
    with pytest.raises(ValueError, match="width must be an even integer"):
        build_tiny_text_encoder(tmp_path / "x", "t5", width=15)


def damaged_copy(source, target, damage):
    """A copy of the encoder folder ``source`` with ``damage(folder)`` applied."""
    import shutil

    shutil.copytree(source, target)
    damage(target)
    return target


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


class Planted:
    """An object no loader allows (DeepSpeed allows argparse.Namespace in torch's safe loader process-wide)."""


def planted_pickle(folder):
    """Weights only as a pickle holding an object torch's safe loader refuses."""
    (folder / "model.safetensors").unlink()
    torch.save({"planted": Planted()}, folder / "pytorch_model.bin")


@pytest.mark.parametrize("damage", [truncate_weights, planted_pickle], ids=["truncated", "pickle"])
def test_damaged_encoder_files_are_an_error_naming_the_folder(encoders, tmp_path, damage):
    folder = damaged_copy(encoders["t5"], tmp_path / "t5", damage)
    with pytest.raises(OSError, match=f"^text encoder '{folder}': cannot load a transformers encoder and tokenizer "
                                      "from a local directory: "):
        TextEncoder.load(folder, 8)


def test_max_length_is_bounded_for_relative_position_encoders(encoders):
    """T5 has no position table: its tokenizer's model_max_length bounds the captions (100000 tokens would
    allocate gigabytes)."""
    from transformers import AutoTokenizer

    limit = AutoTokenizer.from_pretrained(encoders["t5"]).model_max_length
    assert limit < 10**6
    with pytest.raises(ValueError, match=f"max_length 100000 exceeds its tokenizer's model_max_length {limit}"):
        TextEncoder.load(encoders["t5"], 100000)

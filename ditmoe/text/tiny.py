"""Tiny randomly initialised text encoders that need no download: for tests and the digits demo.

``build_tiny_text_encoder(path, kind)`` saves a two-layer encoder and its tokenizer with
``save_pretrained``, so ``TextEncoder.load(path, max_length)`` reads it offline like any checkpoint:

* ``kind="t5"``: a ``T5EncoderModel`` with the byte-level ``ByT5Tokenizer`` (built without files;
  one token per UTF-8 byte plus ``</s>``: "a handwritten three" is 20 tokens).
* ``kind="clip"``: a ``CLIPTextModel`` with a ``CLIPTokenizer`` (byte-level BPE, lower case) whose merges
  make each word of :data:`WORDS` (every word of the digit captions and a few common ones) a single
  token; other words fall back to smaller pieces, down to single bytes, so every text tokenizes.
  "a handwritten three" is 5 tokens with ``<|startoftext|>`` and ``<|endoftext|>``.

The weights depend only on ``seed`` (the global RNG is left as it was), so the same call always saves
the same encoder.
"""

from pathlib import Path

import torch

KINDS = ("t5", "clip")
# Words the tiny CLIP tokenizer keeps whole, besides those of the digit captions.
COMMON_WORDS = ("a", "an", "and", "black", "digit", "drawing", "image", "in", "is", "of", "on", "photo",
                "picture", "the", "white", "with", "written")
# The words of the digits demo's captions (ditmoe/data/digit_captions.py; a test checks that it has them all).
DIGIT_CAPTION_WORDS = ("digit", "eight", "five", "four", "handwritten", "image", "nine", "number", "one", "picture",
                       "seven", "six", "the", "three", "two", "zero")
WORDS = tuple(sorted(set(COMMON_WORDS) | set(DIGIT_CAPTION_WORDS)))
CLIP_MAX_POSITIONS = 77
T5_MAX_LENGTH = 512  # the model_max_length of the T5 tokenizers (relative positions: no table to bound it)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _learn_merges(words):
    """BPE merges that make each of ``words`` one token: learnt on the word list (each word once), taking the
    most frequent adjacent pair each round, ties to the smallest pair, until every word is one symbol.
    Encoding replays the merges in this order, so each word of the list ends as a single token."""
    pieces = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        counts = {}
        for p in pieces:
            for pair in zip(p, p[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for p in pieces:
            i = 0
            while i < len(p) - 1:
                if (p[i], p[i + 1]) == best:
                    p[i:i + 2] = [p[i] + p[i + 1]]
                i += 1


def _clip_tokenizer():
    """A ``CLIPTokenizer``: the 256 byte symbols (alone and ending a word), merges for :data:`WORDS`."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(WORDS)
    symbols = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(symbols + [BOS, EOS]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                         model_max_length=CLIP_MAX_POSITIONS)


def _t5(width):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer(extra_ids=0, model_max_length=T5_MAX_LENGTH)  # bytes + pad, eos, unk: 259 ids
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=max(1, width // 2), d_ff=2 * width,
                      num_layers=2, num_decoder_layers=0, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config), tokenizer


def _clip(width):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            projection_dim=width, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=CLIP_MAX_POSITIONS, attention_dropout=0.0,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(config), tokenizer


def build_tiny_text_encoder(path, kind: str = "t5", width: int = 16, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` ("t5" or "clip") text encoder of hidden size ``width`` (even) and its
    tokenizer to the directory ``path``; return ``path``. Deterministic in ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
        raise ValueError(f"width must be an even integer >= 2 (two attention heads), got {width!r}")
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tokenizer = (_t5 if kind == "t5" else _clip)(width)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

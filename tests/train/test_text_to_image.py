"""Text-to-image (EC-DiT) through the real commands: the digits with captions embedded by the tiny frozen text
encoder, trained under DeepSpeed, resumed, and sampled from prompts."""

import json

import numpy as np
import pytest
import torch

from ditmoe.diffusion import ClassifierFreeGuidance
from ditmoe.model import DiT, get_preset
from ditmoe.model.conditioning import Caption

from conftest import eval_records, free_port, metrics, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

SMALL_T2I = ["--preset", "demo-t2i", "--global-batch-size", "16", "--micro-batch-size", "8",
             "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
             "--set", "log_every=1",
             "--set", "eval_samples=0", "--set", "eval_every=0", "--set", "sample_every=0", "--seed", "3",
             "--set", "lr=3e-3"]
ENV = {"OMP_NUM_THREADS": "1"}


def train(out, *args, check=True):
    return run_cli(["-m", "ditmoe.train", *SMALL_T2I, *args, "--out", str(out)], env=ENV, check=check)


def losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(out)]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    """4 steps, checkpoints at 2 and 4 (ZeRO-1, one rank)."""
    out = tmp_path_factory.mktemp("t2i") / "run"
    train(out, "--steps", "4", "--zero-stage", "1", "--set", "ckpt_every=2")
    return out


def test_caption_data_and_checkpoint_record_the_text_encoder(t2i_run):
    manifest = json.loads((t2i_run / "data/digits-t2i/manifest.json").read_text())
    assert (manifest["text_dim"], manifest["text_max_length"]) == (16, 8)
    meta = json.loads((t2i_run / "checkpoints/step_00000004/meta.json").read_text())
    assert meta["text_encoder"] == {"name": manifest["text_encoder"], "max_length": 8}
    assert meta["model_config"]["text_dim"] == 16 and meta["model_config"]["routing"] == "expert_choice"
    assert len({loss for _, loss, _ in losses(t2i_run)}) == 4


def test_resume_is_bit_identical(t2i_run, tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "2", "--zero-stage", "1", "--set", "ckpt_every=2")
    train(out, "--steps", "4", "--zero-stage", "1", "--set", "ckpt_every=2", "--resume", "auto")
    assert losses(out) == losses(t2i_run)
    a = torch.load(t2i_run / "checkpoints/step_00000004/ema.pt", weights_only=True)
    b = torch.load(out / "checkpoints/step_00000004/ema.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


LAUNCH2 = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]


@pytest.mark.parametrize("stage, ep", [(2, 1), (3, 1), (3, 2)], ids=["2", "3", "3-ep2"])
def test_zero_on_two_ranks_with_activation_checkpointing_matches_one_process(t2i_run, tmp_path, stage, ep):
    """Also EC-DiT's GELU experts split over 2 ranks (expert parallelism), as the preset is."""
    out = tmp_path / "run"
    launch = [*LAUNCH2, "--master_port", str(free_port())]
    run_cli([*launch, "-m", "ditmoe.train", *SMALL_T2I, "--steps", "4", "--zero-stage", str(stage), "--ep-size",
             str(ep), "--activation-checkpointing", "1", "--set", "ckpt_every=2", "--out", str(out),
             # with EP, the evaluations too: a ragged last validation batch and 150 samples in batches of 100 must
             # still give every rank's all-to-alls equal token counts
             *(["--set", "eval_every=4", "--set", "sample_every=4", "--set", "sample_samples=150", "--set",
                "eval_steps=2"] if ep > 1 else [])], env=ENV)
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(losses(out), losses(t2i_run), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5), step
        assert norm == pytest.approx(ref_norm, rel=1e-4), step
    if ep > 1:
        assert [sorted(k for k in r if k.startswith("samples/")) for r in eval_records(out)] == \
            [["samples/cond_accuracy", "samples/diversity", "samples/pixel_fd", "samples/pixel_fd_real_floor"]]


def test_sampling_from_prompts(t2i_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 3\na picture of the number seven\n")
    out = tmp_path / "s.npz"
    proc = run_cli(["tools/sample.py", "--ckpt", str(t2i_run), "--out", str(out), "--num-samples", "6",
                    "--prompt", "number one", "--prompts", str(prompts), "--sampler", "ddim",
                    "--steps", "4", "--cfg-scale", "2", "--grid", str(tmp_path / "grid.png")], env=ENV)
    assert "wrote 6 samples" in proc.stdout
    with np.load(out) as npz:
        assert npz["arr_0"].shape == (6, 8, 8, 1)
        assert list(npz["prompts"]) == ["number one", "the digit 3", "a picture of the number seven"]
        assert list(npz["arr_1"]) == [0, 1, 2, 0, 1, 2]
        assert len({npz["arr_0"][i].tobytes() for i in range(6)}) == 6
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_sampling_prompts_on_two_ranks_equals_one_process(t2i_run, tmp_path):
    args = ["--ckpt", str(t2i_run), "--num-samples", "6", "--batch-size", "2", "--prompt", "the digit 3",
            "--prompt", "number seven", "--sampler", "ddim", "--steps", "3", "--cfg-scale", "2"]
    run_cli(["tools/sample.py", *args, "--out", str(tmp_path / "one.npz")], env=ENV)
    run_cli([*LAUNCH2, "--master_port", str(free_port()), "tools/sample.py", *args, "--out", str(tmp_path / "two.npz")],
            env=ENV)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
        assert list(one["prompts"]) == list(two["prompts"])


@pytest.mark.parametrize("args, message", [
    ([], "a text-conditioned model needs prompts"),
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
])
def test_sampling_a_text_model_without_prompts_is_a_clear_error(t2i_run, tmp_path, args, message):
    proc = run_cli(["tools/sample.py", "--ckpt", str(t2i_run), "--out", str(tmp_path / "s.npz"), "--num-samples", "2",
                    *args], env=ENV, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_class_model_on_caption_data_is_a_clear_error(t2i_run, tmp_path):
    proc = run_cli(["-m", "ditmoe.train", "--preset", "demo", "--data", str(t2i_run / "data/digits-t2i"),
                    "--steps", "1", "--out", str(tmp_path / "run")], env=ENV, check=False)
    assert proc.returncode == 1 and "holds captions: train a text-conditioned preset" in proc.stderr, proc.stderr


def test_guidance_mixes_the_caption_and_the_learned_null_caption():
    """CFG on a caption: the doubled batch's second half is the null caption (drop mask), not another label."""
    torch.manual_seed(0)
    model = DiT(get_preset("EC-DiT-tiny")).eval()
    for p in model.parameters():  # leave DiT's zero init: every output would be 0
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    caption = Caption(torch.randn(3, 8, 16), torch.arange(8).expand(3, 8) < torch.tensor([[3], [8], [5]]))
    guided = ClassifierFreeGuidance(model, 2.5, null_label=-1)(x, t, caption)
    cond = model(x, t, caption, torch.zeros(3, dtype=torch.bool))
    uncond = model(x, t, caption, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)


def test_an_ec_dit_preset_without_learned_sigma_trains_and_samples_with_ddpm(tmp_path):
    """EC-DiT presets predict no variance (learn_sigma=False): the DDPM objective must then learn none either."""
    out = tmp_path / "run"
    run_cli(["-m", "ditmoe.train", *SMALL_T2I, "--steps", "1", "--set", "model.learn_sigma=false", "--out", str(out)],
            env=ENV)
    proc = run_cli(["tools/sample.py", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--num-samples", "2",
                    "--prompt", "the digit 4", "--sampler", "ddim", "--steps", "3"], env=ENV)
    assert "wrote 2 samples" in proc.stdout


def test_the_minilm_digits_demo_embeds_its_captions_with_the_pretrained_encoder(tmp_path):
    """demo-t2i-minilm, tiny: the digits' captions go through the verified MiniLM (384-d token states, no caption
    cut by the 10-token limit), the checkpoint records the encoder by name, and the validation split exists."""
    out = tmp_path / "run"
    run_cli(["-m", "ditmoe.train", *SMALL_T2I, "--preset", "demo-t2i-minilm", "--steps", "2", "--set", "eval_every=2",
             "--set", "sample_every=2", "--set", "sample_samples=100", "--set", "eval_steps=2", "--out", str(out)],
            env={**ENV, "HF_HUB_OFFLINE": "1"})
    manifest = json.loads((out / "data/digits-t2i/manifest.json").read_text())
    assert (manifest["text_encoder"], manifest["text_max_length"], manifest["text_dim"]) == ("minilm", 10, 384)
    assert manifest["num_samples"] == 1797 - 179
    meta = json.loads((out / "checkpoints/step_00000002/meta.json").read_text())
    assert meta["text_encoder"] == {"name": "minilm", "max_length": 10}
    from ditmoe.data.latent_loader import read_fixed_samples

    x, captions, labels = read_fixed_samples(out / "data/digits-t2i-val", 1000, seed=0)
    assert len(x) == 179 and captions.tokens.shape[1:] == (10, 384)
    assert int(captions.mask.sum(1).max()) == 8  # "an image of the digit seven" with [CLS] and [SEP]
    record = eval_records(out)[0]  # validation and the periodic samples: the held-out captions, guided
    assert record["step"] == 2 and 0 <= record["samples/cond_accuracy"] <= 1 and record["samples/pixel_fd"] > 0
    assert (out / "samples" / "step_00000002.png").is_file()

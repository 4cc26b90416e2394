"""tools/sample.py on a model of VAE latents: the samples are decoded by the VAE the checkpoint records (or
``--vae``) into the npz's images; a latent model with no VAE recorded or given is refused."""

import json
import shutil

import numpy as np
import pytest
import torch

from ditmoe.checkpoint import read_meta, resolve_checkpoint
from ditmoe.data.latent_format import write_latent_dataset
from ditmoe.data.synthetic import save_tiny_vae
from ditmoe.eval.sample_npz import ImageDecoder, image_decoder

from conftest import free_port, load_tool, run_cli

MODEL = ["--preset", "demo", "--set", "model.in_channels=4", "--set", "model.input_size=4", "--set",
         "model.num_classes=2", "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2"]
SCALE = 0.5  # the dataset's scaling factor (the tiny VAE's config says 0.18215)
# 3 samples in batches of 2 (the last one short): batch b is decoded on its own, as the tool does
SAMPLE = ["--num-samples", "3", "--batch-size", "2", "--sampler", "ddim", "--steps", "2", "--seed", "4"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, tiny_vae):
    """A 2-step run on 16 latents (4, 4, 4) of two classes as the tiny VAE's (32-pixel images)."""
    root = tmp_path_factory.mktemp("latent_run")
    latents = np.random.default_rng(0).standard_normal((16, 4, 4, 4)).astype(np.float32)
    write_latent_dataset(root / "data", latents, 0.0, np.arange(16) % 2, vae=str(tiny_vae), scaling_factor=SCALE,
                         resolution=32)
    run_cli(["-m", "ditmoe.train", *MODEL, "--data", str(root / "data"), "--global-batch-size", "8", "--steps", "2",
             "--set", "eval_every=0", "--set", "eval_samples=0", "--out", str(root / "run")])
    return root / "run"


def sample(ckpt, out, *args, check=True):
    return run_cli(["tools/sample.py", "--ckpt", str(ckpt), "--out", str(out), *SAMPLE, *args], check=check)


def latents_of(ckpt) -> torch.Tensor:
    """The latents tools/sample.py draws with SAMPLE, generated here."""
    from ditmoe.diffusion import objective_for
    from ditmoe.inference import load_model
    from ditmoe.sampling import balanced_labels, generate

    model, meta = load_model(ckpt)
    objective = objective_for(meta["train_config"]["objective"], model.config)
    return generate(model, objective, balanced_labels(3, 2), sampler="ddim", steps=2, batch_size=2, seed=4)


def decoded_by_hand(latents: torch.Tensor, vae_path, scaling_factor: float) -> np.ndarray:
    from ditmoe.data.vae_encode import load_vae
    from ditmoe.eval.latent_quality import decode_latents

    vae = load_vae(str(vae_path), "cpu")
    return torch.cat([decode_latents(vae, batch, scaling_factor) for batch in latents.split(2)]).numpy()


@pytest.mark.slow
def test_latent_samples_are_decoded_by_the_recorded_vae(latent_run, tiny_vae, tmp_path):
    meta = read_meta(resolve_checkpoint(latent_run, "latest"))
    assert meta["vae"] == {"name": str(tiny_vae), "scaling_factor": SCALE}
    proc = sample(latent_run, tmp_path / "s.npz", "--grid", str(tmp_path / "grid.png"))
    assert "wrote 3 samples of shape (32, 32, 3)" in proc.stdout and (tmp_path / "grid.png").is_file()
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (3, 32, 32, 3)
    assert np.array_equal(data["arr_1"], [0, 1, 0])
    latents = latents_of(latent_run)
    assert np.array_equal(data["arr_0"], decoded_by_hand(latents, tiny_vae, SCALE))
    # --vae identity: the latents as they are, as before the VAE was recorded
    sample(latent_run, tmp_path / "raw.npz", "--vae", "identity")
    raw = np.load(tmp_path / "raw.npz")["arr_0"]
    assert raw.shape == (3, 4, 4, 4) and np.array_equal(raw, ((latents.clamp(-1, 1) + 1) * 127.5).round()
                                                        .to(torch.uint8).permute(0, 2, 3, 1).numpy())


@pytest.mark.slow
def test_each_rank_decodes_its_share(latent_run, tiny_vae, tmp_path):
    """2 gloo ranks, a batch each: every part holds images, and the npz is the hand-decoded one."""
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "--master_addr", "127.0.0.1", "tools/sample.py", "--ckpt", str(latent_run), "--out",
                    str(tmp_path / "s.npz"), *SAMPLE], env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.count("wrote 3 samples of shape (32, 32, 3)") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]
    expected = decoded_by_hand(latents_of(latent_run), tiny_vae, SCALE)
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], expected)


@pytest.mark.slow
def test_a_checkpoint_without_a_vae_record_needs_vae(latent_run, tiny_vae, tmp_path):
    """A checkpoint written before the record: a clear error naming --vae, and --vae/--scaling-factor supply it."""
    old = tmp_path / "old"
    shutil.copytree(latent_run / "checkpoints", old)
    meta_file = resolve_checkpoint(old, "latest") / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["vae"]
    meta_file.write_text(json.dumps(meta))
    proc = sample(old, tmp_path / "s.npz", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the checkpoint records no VAE and its model samples 4-channel latents, not images: pass --vae PATH_OR_ID" \
        in proc.stderr
    assert not (tmp_path / "s.npz").exists()
    sample(old, tmp_path / "s.npz", "--vae", str(tiny_vae), "--scaling-factor", str(SCALE))
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], decoded_by_hand(latents_of(old), tiny_vae, SCALE))


@pytest.mark.slow
def test_an_exported_folder_records_the_vae_and_samples_the_same_images(latent_run, tiny_vae, tmp_path):
    run_cli(["tools/convert_ckpt_to_hf.py", "--ckpt", str(latent_run), "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["vae_name_or_path"], config["vae_scaling_factor"]) == (str(tiny_vae), SCALE)
    assert f"| VAE | `{tiny_vae}`" in (tmp_path / "hf" / "README.md").read_text()
    sample(latent_run, tmp_path / "run.npz")
    sample(tmp_path / "hf", tmp_path / "hf.npz")
    assert np.array_equal(np.load(tmp_path / "run.npz")["arr_0"], np.load(tmp_path / "hf.npz")["arr_0"])


def test_the_decoder_of_pixel_models_is_the_identity():
    decode = image_decoder({}, 1, None, None, torch.device("cpu"))
    assert decode == ImageDecoder(None, 1.0)
    x = torch.linspace(-1.2, 1.2, 16).reshape(1, 1, 4, 4)
    assert np.array_equal(decode(x)[..., 0], ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[:, 0])
    recorded = {"vae": {"name": "identity", "scaling_factor": 1.0}}
    assert image_decoder(recorded, 1, None, None, torch.device("cpu")) == ImageDecoder(None, 1.0)
    with pytest.raises(ValueError, match="records no VAE and its model samples 4-channel latents.*--vae PATH_OR_ID"):
        image_decoder({"vae": None}, 4, None, None, torch.device("cpu"))


@pytest.mark.slow
def test_the_scaling_factor_is_the_flag_the_record_or_the_vae_config(tiny_vae, tmp_path):
    cpu = torch.device("cpu")
    recorded = {"vae": {"name": str(tiny_vae), "scaling_factor": SCALE}}
    assert image_decoder(recorded, 4, None, None, cpu).scaling_factor == SCALE
    assert image_decoder(recorded, 4, str(tiny_vae), None, cpu).scaling_factor == SCALE
    assert image_decoder(recorded, 4, None, 2.0, cpu).scaling_factor == 2.0
    other = shutil.copytree(tiny_vae, tmp_path / "other")  # another VAE: its own config's factor
    assert image_decoder(recorded, 4, str(other), None, cpu).scaling_factor == pytest.approx(0.18215)
    assert image_decoder({}, 4, str(other), None, cpu).vae is not None
    with pytest.raises(ValueError, match="decodes 4-channel latents, the model samples 3 channels"):
        image_decoder(recorded, 3, None, None, cpu)
    with pytest.raises(OSError, match=f"--vae '{tmp_path / 'none'}': cannot load a diffusers AutoencoderKL"):
        image_decoder(recorded, 4, str(tmp_path / "none"), None, cpu)


@pytest.mark.parametrize("args, message", [
    (["--scaling-factor", "0"], "--scaling-factor must be positive, got 0.0"),
    (["--scaling-factor", "inf"], "--scaling-factor must be a finite number > 0, got inf"),
    (["--vae", " "], "--vae must name a VAE folder or hub id (or 'identity')"),
])
def test_bad_vae_flags_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("sample").parse_args(["--ckpt", "run", "--out", "s.npz", "--num-samples", "4", *args])
    assert exit_info.value.code == 2 and f"error: {message}\n" in capsys.readouterr().err

"""LatentQuality: latents decoded with the dataset's (tiny, random) VAE, and ADM's metrics of images against a
reference batch with a random-weights FID Inception; FrechetReference against frechet_distance; its errors."""

import numpy as np
import pytest
import torch

from ditmoe.data.latent_format import read_manifest, write_latent_dataset
from ditmoe.data.synthetic import natural_image, save_tiny_vae
from ditmoe.eval.adm_evaluator import write_reference_batch
from ditmoe.eval.adm_metrics import inception_score
from ditmoe.eval.frechet import FrechetReference, feature_statistics, frechet_distance
from ditmoe.eval.inception import WEIGHTS_ENV, InceptionV3, load_inception
from ditmoe.eval.latent_quality import LatentQuality
from ditmoe.sampling import to_uint8_images

pytestmark = pytest.mark.usefixtures("one_thread")  # much faster on the shared CPU cores

IDENTITY = {"vae": "identity", "scaling_factor": 1.0}  # the digits datasets: the latents are the images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random Inception weights; 8 photo-like 32x32 images; their ADM reference batch with statistics (written by
    the evaluator) and one with the images only."""
    root = tmp_path_factory.mktemp("latent_quality")
    torch.manual_seed(0)
    torch.save(InceptionV3().state_dict(), root / "weights.pth")
    images = np.stack([natural_image(32, 32, seed) for seed in range(8)])
    np.savez(root / "images.npz", arr_0=images)
    write_reference_batch(str(root / "images.npz"), str(root / "ref.npz"), str(root / "weights.pth"), batch_size=4)
    return root


@pytest.fixture(scope="module")
def vae_manifest(tmp_path_factory):
    """The manifest of a latent dataset encoded by a tiny random VAE (x8, 4 channels), scaling factor 0.5."""
    root = tmp_path_factory.mktemp("vae_data")
    vae = save_tiny_vae(root / "vae")
    write_latent_dataset(root / "latents", np.zeros((2, 4, 4, 4), np.float32), 0.0, [0, 1], vae=str(vae),
                         scaling_factor=0.5, resolution=32)
    return read_manifest(root / "latents")


def latents(n, channels=4, size=4, seed=0):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_decode_matches_the_vae_by_hand(vae_manifest):
    from diffusers import AutoencoderKL

    rng_state = torch.get_rng_state()
    quality = LatentQuality(vae_manifest, None, "cpu", batch_size=2)
    z = latents(5)
    images = quality.decode(z)  # batches of 2, 2 and 1
    assert torch.equal(torch.get_rng_state(), rng_state)  # building and decoding drew no random numbers
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    vae = AutoencoderKL.from_pretrained(vae_manifest["vae"], low_cpu_mem_usage=False)
    with torch.no_grad():
        pixels = vae.decode(z / 0.5).sample  # all five at once
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected).max() <= 1 and (images == expected).mean() > 0.99
    assert images.std() > 0  # not a constant image
    assert np.array_equal(quality.decode(z.bfloat16()), quality.decode(z.bfloat16().float()))  # any float dtype
    assert quality.quality(images) == {}  # no reference batch
    with pytest.raises(ValueError, match="latents have 3 channels, the dataset's vae '.*vae' takes 4"):
        quality.decode(latents(2, channels=3))


def test_identity_datasets_decode_to_their_pixels():
    z = torch.rand(3, 1, 8, 8) * 2.4 - 1.2  # beyond [-1, 1]: clamped
    images = LatentQuality(IDENTITY, None, "cpu").decode(z)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images, to_uint8_images(z).numpy().repeat(3, axis=3))
    halved = LatentQuality({"vae": "identity", "scaling_factor": 2.0}, None, "cpu").decode(z * 2)
    assert np.array_equal(halved, images)


@pytest.mark.parametrize("n", [10, 300])  # fewer samples than dimensions (N x N Gram matrix), and more
def test_frechet_reference_gives_frechet_distance(n):
    rng = np.random.default_rng(n)
    mu, sigma = feature_statistics(rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)))
    features = 1.3 * rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) + 0.5
    expected = frechet_distance(mu, sigma, *feature_statistics(features))
    # frechet_distance takes the square roots of the ~1e-12 rounding noise of the zero eigenvalues of a singular
    # S1^(1/2) S2 S1^(1/2) (N = 10): relative differences of ~2e-8
    assert FrechetReference(mu, sigma).distance(features) == pytest.approx(expected, rel=1e-7)
    singular_mu, singular_sigma = feature_statistics(features[:5])  # rank 4 in 64 dimensions
    assert abs(FrechetReference(singular_mu, singular_sigma).distance(features[:5])) < 1e-9 * np.trace(singular_sigma)


@pytest.fixture(scope="module")
def with_stats(files):
    """LatentQuality against the reference batch with statistics (FID, sFID, IS)."""
    return LatentQuality(IDENTITY, str(files / "ref.npz"), "cpu", inception_weights=str(files / "weights.pth"),
                         batch_size=3)


@pytest.mark.slow
def test_reference_images_score_zero_against_their_own_statistics(files, with_stats):
    images = np.load(files / "images.npz")["arr_0"]
    rng_state, tf32 = torch.get_rng_state(), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # a training run's setting
    try:
        metrics = with_stats.quality(images)
        assert torch.backends.cuda.matmul.allow_tf32  # TF32 was off for the Inception pass only
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert sorted(metrics) == ["fid", "inception_score", "sfid"]
    assert metrics["fid"] == pytest.approx(0, abs=1e-6) and metrics["sfid"] == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        probs = load_inception(files / "weights.pth")(torch.from_numpy(images).permute(0, 3, 1, 2)).probs
    assert metrics["inception_score"] == pytest.approx(inception_score(probs.numpy()), rel=1e-6)
    shifted = with_stats.quality(np.clip(images.astype(int) + 64, 0, 255).astype(np.uint8))
    assert shifted["fid"] > 1.0 and shifted["sfid"] > 1.0
    assert with_stats.quality(images[:, :, :, 0])["fid"] > 1e-3  # grayscale is taken (and differs)


@pytest.mark.slow
def test_reference_of_images_only_gives_the_same_metrics_and_precision_recall(files, with_stats):
    """Statistics computed from arr_0 once, at construction, and the pool features for precision/recall."""
    images = np.load(files / "images.npz")["arr_0"]
    shifted = np.clip(images.astype(int) + 64, 0, 255).astype(np.uint8)
    quality = LatentQuality(IDENTITY, str(files / "images.npz"), "cpu", inception_weights=str(files / "weights.pth"),
                            precision_recall=True)
    own = quality.quality(images)
    assert sorted(own) == ["fid", "inception_score", "precision", "recall", "sfid"]
    assert own["fid"] == pytest.approx(0, abs=1e-6) and (own["precision"], own["recall"]) == (1.0, 1.0)
    other, expected = quality.quality(shifted), with_stats.quality(shifted)
    for key in expected:
        assert other[key] == pytest.approx(expected[key], rel=1e-6)
    assert 0 <= other["precision"] < 1


@pytest.mark.slow
def test_bad_images_are_named(with_stats):
    with pytest.raises(ValueError, match=r"quality: images must hold uint8 images, got float32"):
        with_stats.quality(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"quality: the metrics need at least 4 images"):
        with_stats.quality(np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 3\) images or grayscale"):
        with_stats.quality(np.zeros((4, 8, 8, 4), np.uint8))


def test_bad_reference_files_are_named_before_any_network_loads(tmp_path, monkeypatch):
    weights = str(tmp_path / "none.pth")  # never read: the reference batch is checked first
    with pytest.raises(FileNotFoundError, match="none.npz: no such file"):
        LatentQuality(IDENTITY, str(tmp_path / "none.npz"), "cpu", inception_weights=weights)
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(ValueError, match="text.npz: not an .npz file"):
        LatentQuality(IDENTITY, str(tmp_path / "text.npz"), "cpu", inception_weights=weights)
    np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
    with pytest.raises(ValueError, match="labels.npz: neither arr_0 nor mu, sigma, mu_s, sigma_s"):
        LatentQuality(IDENTITY, str(tmp_path / "labels.npz"), "cpu", inception_weights=weights)
    np.savez(tmp_path / "three.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="three.npz: the metrics need at least 4 images"):
        LatentQuality(IDENTITY, str(tmp_path / "three.npz"), "cpu", inception_weights=weights)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(ValueError, match=r"stats.npz: mu_s has shape \(3,\), expected \(2023,\)"):
        LatentQuality(IDENTITY, str(tmp_path / "stats.npz"), "cpu", inception_weights=weights)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(ValueError, match="stats.npz: precision and recall need the reference images"):
        LatentQuality(IDENTITY, str(tmp_path / "stats.npz"), "cpu", inception_weights=weights, precision_recall=True)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(ValueError, match=f"FID against .*ref.npz needs the FID Inception weights: pass "
                                         f"inception_weights or set \\${WEIGHTS_ENV}"):
        LatentQuality(IDENTITY, str(tmp_path / "ref.npz"), "cpu")
    monkeypatch.setenv(WEIGHTS_ENV, weights)
    with pytest.raises(FileNotFoundError, match="none.pth: no such Inception weights file"):
        LatentQuality(IDENTITY, str(tmp_path / "ref.npz"), "cpu")


def test_bad_manifests_and_latents_are_named():
    with pytest.raises(ValueError, match=r"the manifest must name its vae and scaling_factor .*got \['vae'\]"):
        LatentQuality({"vae": "identity"}, None, "cpu")
    with pytest.raises(ValueError, match="scaling_factor must be a positive number, got 0"):
        LatentQuality({"vae": "identity", "scaling_factor": 0}, None, "cpu")
    quality = LatentQuality(IDENTITY, None, "cpu")
    with pytest.raises(ValueError, match=r"latents must be a \(N >= 1, C, h, w\) tensor, got \(2, 8, 8\)"):
        quality.decode(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="vae 'identity' are images of 1 or 3 channels, got 4"):
        quality.decode(torch.zeros(2, 4, 8, 8))


@pytest.mark.slow
def test_missing_or_damaged_vae_is_named(vae_manifest, tmp_path):
    missing = str(tmp_path / "no-vae")
    with pytest.raises(OSError, match=f"the dataset's vae '{missing}': cannot load a diffusers AutoencoderKL"):
        LatentQuality({**vae_manifest, "vae": missing}, None, "cpu")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text(open(f"{vae_manifest['vae']}/config.json").read())
    (damaged / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OSError, match=f"the dataset's vae '{damaged}': .*diffusion_pytorch_model.safetensors"):
        LatentQuality({**vae_manifest, "vae": str(damaged)}, None, "cpu")

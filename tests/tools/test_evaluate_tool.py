"""tools/evaluate.py end to end on a few tiny images with a random-weights Inception, and its errors."""

import json
import re

import numpy as np
import pytest
import torch

from ditmoe.eval.adm_metrics import inception_score
from ditmoe.eval.frechet import feature_statistics
from ditmoe.eval.inception import InceptionV3, load_inception

from conftest import load_tool, run_cli

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # shared CPU cores: avoids OpenMP oversubscription


tool = load_tool("evaluate")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random Inception weights, and 5 grayscale 12x12 images as (N, H, W) and as (N, H, W, 3)."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    torch.save(InceptionV3().state_dict(), root / "weights.pth")
    gray = np.random.default_rng(0).integers(0, 256, (5, 12, 12), dtype=np.uint8)
    np.savez(root / "gray.npz", arr_0=gray)
    np.savez(root / "rgb.npz", arr_0=np.repeat(gray[..., None], 3, axis=3))
    return root


@pytest.fixture(scope="module")
def outputs(files, one_thread):
    """Inception outputs of the images, computed here without the tool."""
    images = torch.from_numpy(np.load(files / "rgb.npz")["arr_0"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        return load_inception(files / "weights.pth")(images)


@pytest.fixture(scope="module")
def reference(files):
    """An ADM reference batch written by the tool from the grayscale images."""
    run_cli(["tools/evaluate.py", "--samples", str(files / "gray.npz"), "--write-ref", str(files / "ref.npz"),
             "--inception-weights", str(files / "weights.pth"), "--batch-size", "2"], env=ONE_THREAD)
    return files / "ref.npz"


def test_write_ref_stores_adm_statistics_and_rgb_images(files, outputs, reference):
    ref = np.load(reference)
    assert sorted(ref.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    assert np.array_equal(ref["arr_0"], np.load(files / "rgb.npz")["arr_0"])
    for mu, sigma, feats in [(ref["mu"], ref["sigma"], outputs.pool), (ref["mu_s"], ref["sigma_s"], outputs.spatial)]:
        expected_mu, expected_sigma = feature_statistics(feats.numpy())
        assert mu.shape == (feats.shape[1],) and sigma.shape == (feats.shape[1],) * 2
        assert np.allclose(mu, expected_mu, atol=1e-5) and np.allclose(sigma, expected_sigma, atol=1e-5)
    # enough spread for FID ~ 0 to mean something
    assert np.trace(ref["sigma"]) > 0.5 and np.trace(ref["sigma_s"]) > 0.5


def test_images_against_their_own_reference(files, outputs, reference):
    """The one full run (FID and sFID each take two 2048-d matrix square roots: about a minute here)."""
    out = files / "metrics" / "m.json"
    proc = run_cli(["tools/evaluate.py", "--samples", str(files / "gray.npz"), "--ref", str(reference),
                    "--out", str(out)], env={**ONE_THREAD, "DITMOE_INCEPTION_WEIGHTS": str(files / "weights.pth")})
    metrics = json.loads(out.read_text())
    assert sorted(metrics) == ["fid", "inception_score", "precision", "recall", "ref", "samples", "sfid"]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:5]] == \
        ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    # the product of two equal singular covariances gets frechet.py's 1e-6 diagonal: -2 * 1e-6 * dim
    assert metrics["fid"] == pytest.approx(0, abs=5e-3) and metrics["sfid"] == pytest.approx(0, abs=5e-3)
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["inception_score"] == pytest.approx(inception_score(outputs.probs.numpy()), rel=1e-4)


@pytest.mark.parametrize("content, message", [
    (None, "none.npz: no such file"),
    ("text", "bad.npz: not an .npz file"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "bad.npz: no arr_0 array (it has images)"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "bad.npz: arr_0 must hold uint8 images, got float32"),
    ({"arr_0": np.zeros((4, 8, 8, 4), np.uint8)}, "bad.npz: arr_0 must be (N, H, W, 3) images or grayscale "
                                                  "(N, H, W[, 1]), got shape (4, 8, 8, 4)"),
    ({"arr_0": np.zeros((3, 8, 8), np.uint8)}, "bad.npz: the metrics need at least 4 images (k=3 nearest "
                                               "neighbours), got 3"),
])
def test_bad_samples_file(files, tmp_path, content, message):
    path = tmp_path / ("none.npz" if content is None else "bad.npz")
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(SystemExit) as exit:
        tool.main(["--samples", str(path), "--ref", str(files / "rgb.npz"), "--inception-weights",
                   str(files / "weights.pth")])
    assert str(exit.value) == f"error: {path.parent}/{message}"


def test_bad_reference_file(files, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit, match="ref.npz: has mu, sigma but not mu_s, sigma_s"):
        tool.main(["--samples", str(files / "rgb.npz"), "--ref", str(ref), "--inception-weights", "w.pth"])
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(SystemExit, match=r"ref.npz: mu has shape \(3,\), expected \(2048,\)"):
        tool.main(["--samples", str(files / "rgb.npz"), "--ref", str(ref), "--inception-weights", "w.pth"])
    np.savez(ref, labels=np.zeros(3))
    with pytest.raises(SystemExit, match="ref.npz: neither arr_0 nor mu, sigma, mu_s, sigma_s"):
        tool.main(["--samples", str(files / "rgb.npz"), "--ref", str(ref), "--inception-weights", "w.pth"])


def test_bad_inception_weights(files, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DITMOE_INCEPTION_WEIGHTS", raising=False)
    args = ["--samples", str(files / "rgb.npz"), "--ref", str(files / "rgb.npz")]
    with pytest.raises(SystemExit) as exit_info:
        tool.main(args)
    assert exit_info.value.code == 2
    assert re.search("error: no Inception weights: pass --inception-weights PATH or set", capsys.readouterr().err)
    with pytest.raises(SystemExit, match="none.pth: no such Inception weights file"):
        tool.main([*args, "--inception-weights", str(tmp_path / "none.pth")])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    monkeypatch.setenv("DITMOE_INCEPTION_WEIGHTS", str(tmp_path / "text.pth"))
    with pytest.raises(SystemExit, match="text.pth: not a PyTorch state dict"):
        tool.main(args)


def test_cli_exits_with_an_error_message(files):
    proc = run_cli(["tools/evaluate.py", "--samples", str(files / "rgb.npz"), "--ref", str(files / "none.npz"),
                    "--inception-weights", str(files / "weights.pth")], check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {files / 'none.npz'}: no such file"

"""The real CLI, run as subprocesses on synthetic WebDataset shards with a tiny random VAE."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditmoe.data import LatentLoader
from ditmoe.data.latent_format import read_manifest
from ditmoe.data.precompute import rank_from_env
from ditmoe.data.preprocess import pil_preprocess
from ditmoe.data.synthetic import save_tiny_vae, varied_samples, write_tar
from ditmoe.data.vae_encode import encode_with_flip, load_vae

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models

REPO = Path(__file__).resolve().parents[2]
SHARDS = ["part-000.tar", "part-001.tar", "part-002.tar"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three input shards (bad samples in the first, the third cut short) and the expected latents."""
    root = tmp_path_factory.mktemp("images")
    vae_dir = save_tiny_vae(root / "vae")
    shards = [varied_samples(seed=0), varied_samples(seed=1, bad=False), varied_samples(seed=2, bad=False)]
    for name, samples in zip(SHARDS, shards):
        write_tar(root / name, samples)
    third = (root / SHARDS[2]).read_bytes()
    cut = third.index(b"s02-06.") + 2000  # inside the header+image of the 7th sample
    (root / SHARDS[2]).write_bytes(third[:cut])
    read = shards[0] + shards[1] + shards[2][:7]
    good = {k: f for k, f in read if not k.startswith("bad") and k != "s02-06"}
    keys = list(good)
    images = torch.stack([torch.from_numpy(pil_preprocess(good[k].get("jpg", good[k].get("png")), 256)) for k in keys])
    latents = encode_with_flip(load_vae(str(vae_dir), "cpu"), images).numpy()
    expected = {k: (lat, int(good[k]["cls"])) for k, lat in zip(keys, latents)}
    return root, vae_dir, expected, len(read)


def run_tool(data, out, *extra, env=None, wait=True):
    root, vae_dir, _, _ = data
    cmd = [sys.executable, str(REPO / "tools" / "precompute_latents.py"), "--input", str(root / "part-{000..002}.tar"),
           "--output", str(out), "--resolution", "256", "--vae", str(vae_dir), "--batch-size", "4",
           "--workers", "2", "--device", "cpu", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.communicate() + (proc.returncode,) if wait else proc


def written(out):
    """key -> (latent, label) over all output shards, read with webdataset; fails on duplicate keys."""
    import webdataset as wds

    result = {}
    for shard in read_manifest(out)["shards"]:
        for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False).decode():
            assert s["__key__"] not in result
            result[s["__key__"]] = (s["latent.npy"], s["cls"])
    return result


def check_output(out, data, atol):
    _, vae_dir, expected, num_read = data
    m = read_manifest(out)
    assert (m["vae"], m["resolution"], m["latent_shape"]) == (str(vae_dir), 256, [4, 32, 32])
    assert m["scaling_factor"] == 0.18215 and m["flip"] and m["num_classes"] == 7
    assert m["counts"] == {"read": num_read, "written": len(expected), "rejected": num_read - len(expected)}
    assert [s["name"] for s in m["shards"]] == SHARDS
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert len(rejects) == num_read - len(expected)
    assert reasons["bad-nocls-s00"] == "missing cls"
    assert "undecodable jpg" in reasons["bad-garbage-s00"] and "truncated" in reasons["bad-truncated-s00"]
    assert "cut short" in reasons["s02-06"] and rejects[-1]["shard"].endswith(SHARDS[2])
    got = written(out)
    assert sorted(got) == sorted(expected)
    for key, (latent, label) in got.items():
        assert latent.dtype == np.float16 and latent.shape == (2, 2, 4, 32, 32) and label == expected[key][1]
        np.testing.assert_allclose(latent.astype(np.float32), expected[key][0].astype(np.float32), rtol=2e-3, atol=atol)
    return m


def test_cli_writes_all_good_samples_and_resumes(data, tmp_path):
    out = tmp_path / "latents"
    stdout, stderr, code = run_tool(data, out, "--decoder", "pil")
    assert code == 0, stderr
    assert "read 28 = written 24 + rejected 4" in stdout and "img/s" in stderr
    manifest = check_output(out, data, atol=2e-3)

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    stdout, stderr, code = run_tool(data, out, "--decoder", "pil")
    assert code == 0 and "3 shards (3 already done)" in stdout, stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes

    (out / SHARDS[1]).unlink()  # lost output: only that shard is redone, byte for byte
    stdout, stderr, code = run_tool(data, out, "--decoder", "pil")
    assert code == 0 and "3 shards (2 already done)" in stdout, stderr
    assert read_manifest(out) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != SHARDS[1]} == \
        {k: v for k, v in mtimes.items() if k != SHARDS[1]}

    loader = LatentLoader(out, 4, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (4, 4, 32, 32) and loader.num_samples == 24 and set(y.tolist()) <= set(range(7))

    _, stderr, code = run_tool(data, out, "--decoder", "pil", "--resolution", "512")
    assert code != 0 and "use another --out" in stderr


def test_two_ranks_with_dali_cover_every_sample_once(data, tmp_path):
    out = tmp_path / "latents"
    procs = [run_tool(data, out, "--decoder", "dali", env={"RANK": str(r), "WORLD_SIZE": "2"}, wait=False)
             for r in range(2)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    for stdout, stderr, code in results:
        assert code == 0, stderr
    assert "2 shards (0 already done)" in results[0][0] and "1 shards (0 already done)" in results[1][0]
    assert sum("dataset complete" in r[0] for r in results) >= 1
    check_output(out, data, atol=2e-2)  # DALI pixels are within ~0.02 of PIL's


def test_rank_from_env():
    assert rank_from_env({}) == (0, 1, 0)
    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert rank_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"}) == (5, 8, 2)
    with pytest.raises(ValueError, match="RANK=4 is out of range for WORLD_SIZE=4"):
        rank_from_env({"RANK": "4", "WORLD_SIZE": "4"})

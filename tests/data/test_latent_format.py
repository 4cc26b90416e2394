import json
import os

import numpy as np
import pytest

from ditmoe.data import ManifestError, write_latent_dataset
from ditmoe.data.latent_format import (
    MANIFEST,
    CorruptShardError,
    RecordReader,
    ShardWriter,
    read_manifest,
    record_size,
    verify_shards,
)

from latent_fixtures import make_dataset_fixture  # noqa: F401 (pytest fixture)


def test_roundtrip_and_fixed_records(make_dataset):
    root = make_dataset(n=20, samples_per_shard=8)
    m = read_manifest(root)
    assert [s["num_samples"] for s in m["shards"]] == [8, 8, 4]
    assert m["num_samples"] == 20 and m["num_classes"] == 10 and m["flip"] and m["latent_shape"] == [2, 4, 4]
    assert m["record_bytes"] == record_size((2, 2, 2, 4, 4))
    data = (root / m["shards"][1]["name"]).read_bytes()
    r = m["record_bytes"]
    key, label, latent = RecordReader((2, 2, 2, 4, 4))(data[3 * r:4 * r], shard="s", index=3)
    assert (key, label) == ("000000011", 1)
    assert latent.dtype == np.float16 and latent.shape == (2, 2, 2, 4, 4)
    assert (latent[0, 0] == 11).all() and (latent[1, 0] == -11).all() and (latent[:, 1] == 0).all()
    verify_shards(root, m["shards"])
    assert not [p for p in os.listdir(root) if ".tmp" in p]


def test_shards_are_plain_webdataset(make_dataset):
    import webdataset as wds

    root = make_dataset(n=10, samples_per_shard=10)
    samples = list(wds.WebDataset(str(root / "shard-000000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(10)]
    assert samples[4]["cls"] == 4 and samples[4]["latent.npy"].shape == (2, 2, 2, 4, 4)


def test_no_flip_and_broadcast_std(tmp_path):
    m = write_latent_dataset(tmp_path, np.ones((3, 1, 8, 8)), 0, [0, 1, 1], resolution=8, vae="identity")
    assert not m["flip"] and m["num_classes"] == 2 and m["vae"] == "identity" and m["scaling_factor"] == 1.0
    assert m["record_bytes"] == record_size((1, 2, 1, 8, 8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mean=np.zeros((3, 4, 4)), labels=[0, 0, 0]), "mean must be"),
    (dict(mean=np.zeros((3, 1, 4, 4)), labels=[0, 0]), "labels must be"),
    (dict(mean=np.zeros((3, 1, 4, 4)), labels=[0.5, 0, 0]), "labels must be"),
    (dict(mean=np.zeros((3, 1, 4, 4)), labels=[0, 0, 0], std=np.zeros(5)), "broadcast"),
    (dict(mean=np.zeros((3, 1, 4, 4)), labels=[0, 0, 0], mean_flip=np.zeros((3, 1, 4, 4))), "both"),
    (dict(mean=np.zeros((3, 1, 4, 4)), labels=[0, -1, 0]), "negative class label"),
])
def test_write_rejects_bad_input(tmp_path, kwargs, match):
    kwargs = {"std": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_latent_dataset(tmp_path, kwargs.pop("mean"), kwargs.pop("std"), kwargs.pop("labels"), **kwargs)


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x.tar") as w:
            w.write("a", np.zeros((1, 2, 1, 2, 2), np.float16), 0)
            raise RuntimeError("crash mid-shard")
    assert os.listdir(tmp_path) == []
    with ShardWriter(tmp_path / "x.tar") as w:
        w.write("a", np.zeros((1, 2, 1, 2, 2), np.float16), 0)
        with pytest.raises(ValueError, match="key 'b'.*shape"):
            w.write("b", np.zeros((1, 2, 1, 4, 4), np.float16), 0)
        with pytest.raises(ValueError, match="bad sample key"):
            w.write("c.d", np.zeros((1, 2, 1, 2, 2), np.float16), 0)
        assert not (tmp_path / "x.tar").exists()
        info = w.close()
    assert info["num_samples"] == 1 and (tmp_path / "x.tar").stat().st_size == info["bytes"]


def test_manifest_errors_name_the_shard(make_dataset):
    root = make_dataset(n=20, samples_per_shard=8)
    shards = read_manifest(root)["shards"]
    path = root / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    verify_shards(root, shards, checksum=False)
    with pytest.raises(ManifestError, match="shard-000001.tar: sha256 checksum mismatch"):
        verify_shards(root, shards)
    path.write_bytes(bytes(data[:-512]))
    with pytest.raises(ManifestError, match="shard-000001.tar: .* bytes, manifest says"):
        verify_shards(root, shards, checksum=False)
    path.unlink()
    with pytest.raises(ManifestError, match="shard-000001.tar listed in manifest.json is missing"):
        verify_shards(root, shards, checksum=False)


def test_manifest_file_errors(make_dataset, tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)
    root = make_dataset(n=4)
    m = json.loads((root / MANIFEST).read_text())
    del m["scaling_factor"]
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"missing keys \['scaling_factor'\]"):
        read_manifest(root)


def test_read_record_errors_name_shard_and_key(make_dataset):
    root = make_dataset(n=4, samples_per_shard=4)
    m = read_manifest(root)
    r = m["record_bytes"]
    data = bytearray((root / "shard-000000.tar").read_bytes())
    data[2 * r + 2 * 512] ^= 0x20  # name of the .latent.npy member of sample 2
    with pytest.raises(CorruptShardError, match=r"corrupt latent shard S: sample #2 \(key '000000002'\): expected"):
        RecordReader((2, 2, 2, 4, 4))(bytes(data[2 * r:3 * r]), shard="S", index=2)
    with pytest.raises(CorruptShardError, match=r"sample #1 \(key '000000001'\): expected 000000001.latent.npy of"):
        RecordReader((1, 2, 2, 4, 4))(bytes(data[r:2 * r]), shard="S", index=1)
    with pytest.raises(CorruptShardError, match=r"sample #0 \(key None\): no tar header"):
        RecordReader((2, 2, 2, 4, 4))(bytes(r), shard="S", index=0)

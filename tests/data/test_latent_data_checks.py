"""A latent dataset is checked when it is opened: manifest fields of the wrong type and shards that do not
hold the samples the manifest lists are clear errors naming the file and the key, before any training."""

import json

import pytest

from ditmoe.data import LatentLoader, ManifestError
from ditmoe.data.latent_format import MANIFEST, CorruptShardError, read_manifest
from ditmoe.data.synthetic import write_random_latents

from conftest import run_cli
from latent_fixtures import make_dataset_fixture  # noqa: F401 (pytest fixture)


def edit_manifest(root, edit):
    """Apply ``edit(manifest)`` to ``root``'s manifest.json."""
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def set_num_samples(manifest, shard, delta):
    """Change the count of ``shard`` and the total by ``delta``, consistently."""
    manifest["shards"][shard]["num_samples"] += delta
    manifest["num_samples"] += delta


# 8 records of 2048 bytes: a 20480-byte tar, whose padding also fits 5 to 9 records.
@pytest.mark.parametrize("delta, problem", [
    (-4, "expected 10240 bytes, the file has 20480"),
    (+5, "expected 30720 bytes, the file has 20480"),
    (-1, "expected the end of the archive at byte 14336, found more data (the shard holds more samples)"),
    (+1, "expected the header of sample #8 at byte 16384, found none (the shard holds fewer samples)"),
])
def test_shard_must_hold_the_listed_samples(make_dataset, delta, problem):
    root = make_dataset(n=16, samples_per_shard=8)
    edit_manifest(root, lambda m: set_num_samples(m, 1, delta))
    read_manifest(root)  # the manifest itself is consistent
    with pytest.raises(ManifestError) as err:
        LatentLoader(root, 2, seed=0)
    assert str(err.value) == (f"latent shard {root / 'shard-000001.tar'} does not hold num_samples={8 + delta} "
                              f"records of record_bytes=2048 listed in {MANIFEST}: {problem}")


def test_shards_that_hold_the_listed_samples_pass(make_dataset, tmp_path):
    LatentLoader(make_dataset(n=13, samples_per_shard=5), 2, seed=0)  # 5 + 5 + 3
    write_random_latents(tmp_path / "random", (4, 8, 8), 10, 6)
    LatentLoader(tmp_path / "random", 3, seed=0)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe\x00garbage", "invalid JSON"),
    (b"[1, 2, 3]", "the manifest must be a JSON object, got list"),
])
def test_manifest_that_is_not_json_names_the_file(make_dataset, content, message):
    root = make_dataset(n=4)
    (root / MANIFEST).write_bytes(content)
    with pytest.raises(ManifestError, match=f"^{root / MANIFEST}: {message}"):
        read_manifest(root)


@pytest.mark.parametrize("key, value, message", [
    ("num_samples", "ten", "num_samples must be an integer >= 0, got 'ten'"),
    ("num_samples", -4, "num_samples must be an integer >= 0, got -4"),
    ("num_samples", True, "num_samples must be an integer >= 0, got True"),
    ("num_classes", 0, "num_classes must be a positive integer, got 0"),
    ("record_bytes", 2048.0, "record_bytes must be a positive integer, got 2048.0"),
    ("latent_shape", "2x4x4", "latent_shape must be a list of 3 positive integers [C, H, W], got '2x4x4'"),
    ("latent_shape", [2, 4], "latent_shape must be a list of 3 positive integers [C, H, W], got [2, 4]"),
    ("latent_shape", [2, -4, 4], "latent_shape must be a list of 3 positive integers [C, H, W], got [2, -4, 4]"),
    ("flip", "yes", "flip must be true or false, got 'yes'"),
    ("scaling_factor", "0.18", "scaling_factor must be a positive number, got '0.18'"),
    ("scaling_factor", float("nan"), "scaling_factor must be a positive number, got nan"),
    ("resolution", -32, "resolution must be a positive integer or null, got -32"),
    ("dtype", "float32", "dtype must be 'float16', got 'float32'"),
    ("vae", 3, "vae must be a string, got 3"),
    ("shards", {"shard-000000.tar": 4}, "shards must be a list of shard entries, got {'shard-000000.tar': 4}"),
])
def test_wrong_typed_manifest_field_names_the_file_and_key(make_dataset, key, value, message):
    root = make_dataset(n=4)
    edit_manifest(root, lambda m: m.update({key: value}))
    with pytest.raises(ManifestError) as err:
        read_manifest(root)
    assert str(err.value) == f"{root / MANIFEST}: {message}"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(num_samples="4"), "shards[0].num_samples must be an integer >= 0, got '4'"),
    (lambda s: s.update(num_samples=-4), "shards[0].num_samples must be an integer >= 0, got -4"),
    (lambda s: s.update(bytes=None), "shards[0].bytes must be an integer >= 0, got None"),
    (lambda s: s.update(name=["shard-000000.tar"]), "shards[0].name must be a file name, got ['shard-000000.tar']"),
    (lambda s: s.pop("sha256"), "shards[0] missing keys ['sha256']"),
], ids=["str-count", "negative-count", "null-bytes", "list-name", "no-sha256"])
def test_wrong_typed_shard_entry_names_the_file_and_key(make_dataset, edit, message):
    root = make_dataset(n=4)
    edit_manifest(root, lambda m: edit(m["shards"][0]))
    with pytest.raises(ManifestError) as err:
        read_manifest(root)
    assert str(err.value) == f"{root / MANIFEST}: {message}"


def test_shard_entry_that_is_not_an_object(make_dataset):
    root = make_dataset(n=4)
    edit_manifest(root, lambda m: m.update(shards=[["shard-000000.tar", 4]]))
    with pytest.raises(ManifestError, match=r"manifest.json: shards\[0\] must be a JSON object, got list"):
        read_manifest(root)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(latent_shape="1x8x8"), "latent_shape must be a list of 3 positive integers"),
    (lambda m: set_num_samples(m, 0, -2), "shard-000000.tar does not hold num_samples=10 records"),
], ids=["bad-field", "fewer-samples-listed"])
def test_training_command_stops_before_training(tmp_path, edit, message):
    """A runtime error of ``python -m ditmoe.train``: status 1, one line on stderr, no traceback."""
    root = write_random_latents(tmp_path / "latents", (1, 8, 8), 10, 12)
    edit_manifest(root, edit)
    proc = run_cli(["-m", "ditmoe.train", "--preset", "demo", "--data", str(root), "--steps", "1",
                    "--global-batch-size", "4", "--out", str(tmp_path / "run")], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_label_outside_the_manifests_classes_stops_the_loader_at_its_sample(tmp_path):
    """Labels 0-5 with the manifest saying 5 classes: label 5 would train silently as the null (guidance) class."""
    root = write_random_latents(tmp_path / "latents", (1, 8, 8), 6, 12)
    edit_manifest(root, lambda m: m.update(num_classes=5))
    with pytest.raises(CorruptShardError, match=r"corrupt latent shard .*shard-000000\.tar: sample #\d+ \(key '.*'\): "
                                         r"class label 5 is outside \[0, 5\) \(the manifest's num_classes\)"):
        for _ in zip(range(12), LatentLoader(root, 4, seed=0, num_workers=0)):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("model_classes, message", [
    ("3", "has 5 classes, the model 3: pass --set model.num_classes=5"),  # would be an IndexError
    ("7", "has 5 classes, the model 7: pass --set model.num_classes=5"),
])
def test_training_needs_the_manifests_number_of_classes(tmp_path, model_classes, message):
    root = write_random_latents(tmp_path / "latents", (1, 8, 8), 5, 12)
    proc = run_cli(["-m", "ditmoe.train", "--preset", "demo", "--data", str(root), "--steps", "1", "--set",
                    f"model.num_classes={model_classes}", "--global-batch-size", "4", "--out", str(tmp_path / "run")],
                   check=False)
    assert proc.returncode == 1 and proc.stderr == f"error: data {str(root)!r} {message}\n", proc.stderr


@pytest.mark.slow
def test_training_stops_at_a_label_outside_the_classes_naming_it(tmp_path):
    root = write_random_latents(tmp_path / "latents", (1, 8, 8), 6, 12)
    edit_manifest(root, lambda m: m.update(num_classes=5))
    proc = run_cli(["-m", "ditmoe.train", "--preset", "demo", "--data", str(root), "--steps", "3", "--set",
                    "model.num_classes=5", "--global-batch-size", "4", "--out", str(tmp_path / "run")], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: corrupt latent shard {root / 'shard-000000.tar'}: "
                                                           "sample #")
    assert "class label 5 is outside [0, 5) (the manifest's num_classes)" in proc.stderr

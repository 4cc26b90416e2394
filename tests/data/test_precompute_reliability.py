"""tools/precompute_latents.py loses and corrupts no samples: duplicate keys, 16-bit PNGs, labels out
of range, unsafe keys, stable reject reasons, and no temporary files left behind."""

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditmoe.data.image_shards import ImageShardReader
from ditmoe.data.latent_format import read_manifest
from ditmoe.data.preprocess import error_text, pil_preprocess, to_rgb
from ditmoe.data.synthetic import encode_image, natural_image, save_tiny_vae, write_tar

from conftest import load_tool

pytestmark = pytest.mark.usefixtures("one_thread")  # a tiny VAE on shared CPU cores
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def sample(key, label, seed=0):
    """A 16 x 16 PNG sample of class ``label``."""
    return key, {"png": encode_image(natural_image(16, 16, seed), "PNG"), "cls": str(label).encode()}


def precompute(vae, shard, out, *extra):
    """Run the tool in this process on one input shard; returns its exit status, printing an exit
    message to stderr as the interpreter would."""
    argv = ["--input", str(shard), "--out", str(out), "--resolution", "256", "--vae", str(vae),
            "--batch-size", "4", "--workers", "1", "--device", "cpu", "--decoder", "pil", *extra]
    try:
        load_tool("precompute_latents").main(argv)
    except SystemExit as e:
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    return 0


def rejects(out):
    """key -> reason, from ``rejects.jsonl``."""
    return {r["key"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def member_labels(path):
    """(name, cls) of each sample in a latent shard, in order."""
    with tarfile.open(path) as tar:
        return [(m.name[:-4], int(tar.extractfile(m).read())) for m in tar if m.name.endswith(".cls")]


# 1. Adjacent samples with the same key

def test_adjacent_duplicate_keys_are_separate_samples(tmp_path):
    write_tar(tmp_path / "a.tar", [sample("a", 1, 0), sample("a", 2, 1), sample("b", 3, 2)])
    reader = ImageShardReader(tmp_path / "a.tar")
    assert [(s.key, s.fields["cls"]) for s in reader] == [("a", b"1"), ("a", b"2"), ("b", b"3")]


@pytest.mark.slow
def test_adjacent_duplicate_is_counted_and_rejected(vae, tmp_path):
    write_tar(tmp_path / "a.tar", [sample("a", 1, 0), sample("a", 2, 1), sample("b", 3, 2)])
    assert precompute(vae, tmp_path / "a.tar", tmp_path / "out") == 0
    m = read_manifest(tmp_path / "out")
    assert m["counts"] == {"read": 3, "written": 2, "rejected": 1}
    assert rejects(tmp_path / "out") == {"a": "duplicate key in this shard"}
    assert member_labels(tmp_path / "out" / "a.tar") == [("a", 1), ("b", 3)]  # the first "a" is kept


# 2. 16-bit PNGs

def test_16bit_png_is_scaled_from_its_full_range():
    ramp = np.linspace(0, 65535, 16).round().astype(np.uint16)  # 0, 4369, ..., 65535
    buf = io.BytesIO()
    Image.fromarray(np.tile(ramp, (16, 1))).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    out = pil_preprocess(buf.getvalue(), 16)  # 16 x 16 to 16: no resampling
    expected = np.round(ramp / 257).astype(np.uint8)  # 0, 17, 34, ..., 255
    assert out.shape == (16, 16, 3) and (out == expected[None, :, None]).all()


def test_32bit_integer_image_uses_the_16bit_range():
    image = Image.fromarray(np.array([[0, 257, 32896, 65535, 70000, -5]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 1, 128, 255, 255, 0]


# 3. Labels out of range

def test_labels_out_of_range_are_rejected(vae, tmp_path, capsys):
    samples = [sample("big", 1000000000), sample("neg", -3, 1), sample("two", 2, 2), sample("zero", 0, 3)]
    write_tar(tmp_path / "a.tar", samples)
    assert precompute(vae, tmp_path / "a.tar", tmp_path / "inferred") == 0
    m = read_manifest(tmp_path / "inferred")
    assert m["num_classes"] == 3 and m["counts"] == {"read": 4, "written": 2, "rejected": 2}
    assert rejects(tmp_path / "inferred") == {"big": "cls 1000000000 is outside [0, 1000): see --num-classes",
                                              "neg": "cls -3 is outside [0, 1000): see --num-classes"}

    assert precompute(vae, tmp_path / "a.tar", tmp_path / "two", "--num-classes", "2") == 0
    m = read_manifest(tmp_path / "two")
    assert m["num_classes"] == 2 and m["counts"] == {"read": 4, "written": 1, "rejected": 3}
    assert rejects(tmp_path / "two")["two"] == "cls 2 is outside [0, 2): see --num-classes"
    assert member_labels(tmp_path / "two" / "a.tar") == [("zero", 0)]

    assert precompute(vae, tmp_path / "a.tar", tmp_path / "two", "--num-classes", "5") == 1  # other rejects
    assert "use another --out" in capsys.readouterr().err


def test_num_classes_must_be_positive(vae, tmp_path, capsys):
    assert precompute(vae, tmp_path / "a.tar", tmp_path / "out", "--num-classes", "0") == 2
    assert "--num-classes must be positive" in capsys.readouterr().err


# 4. Keys that are paths out of the dataset

def test_unsafe_keys_are_rejected_and_nothing_escapes(vae, tmp_path):
    keys = ["../../escape", "/abs/path", "a/../../b", "a//b", "./c", "c\\d", "ok/fine"]
    inputs, out = tmp_path / "deep" / "in", tmp_path / "deep" / "out"
    inputs.mkdir(parents=True)
    write_tar(inputs / "a.tar", [sample(key, 1, i) for i, key in enumerate(keys)])
    before = set(tmp_path.rglob("*"))
    assert precompute(vae, inputs / "a.tar", out) == 0
    assert {p for p in set(tmp_path.rglob("*")) - before if out not in p.parents} == {out}
    with tarfile.open(out / "a.tar") as tar:
        names = tar.getnames()
    assert names == ["ok/fine.cls", "ok/fine.latent.npy"]
    assert not any(".." in n or n.startswith("/") for n in names)
    reasons = rejects(out)
    assert sorted(reasons) == sorted(keys[:-1]) and all(r.startswith("unsafe key: ") for r in reasons.values())


# 5. Reject reasons are stable text

def test_reject_reasons_have_no_addresses_and_repeat(vae, tmp_path):
    png = encode_image(natural_image(16, 16, 0), "PNG")
    write_tar(tmp_path / "a.tar", [
        ("garbage", {"jpg": b"\xff\xd8 not really a jpeg", "cls": b"1"}),
        ("text", {"png": b"hello", "cls": b"1"}),
        ("truncated", {"png": png[: len(png) // 2], "cls": b"1"}),
        ("badcls", {"png": png, "cls": b"\xff\xfe"}),
        ("noimage", {"txt": b"x", "cls": b"1"}),
    ])
    assert precompute(vae, tmp_path / "a.tar", tmp_path / "one") == 0
    assert precompute(vae, tmp_path / "a.tar", tmp_path / "two") == 0
    first, second = rejects(tmp_path / "one"), rejects(tmp_path / "two")
    assert first == second and len(first) == 5
    assert not any("0x" in reason or " at " in reason for reason in first.values()), first
    assert first["garbage"] == "undecodable jpg: cannot identify image file"


def test_error_text_drops_object_reprs():
    assert error_text(OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c>")) == \
        "cannot identify image file"
    assert error_text(ValueError()) == "ValueError"


# 6. Temporary files

def temp_files(out):
    return sorted(p.name for p in out.iterdir() if ".tmp" in p.name)


def test_stale_temp_files_are_removed_on_rerun(vae, tmp_path):
    write_tar(tmp_path / "a.tar", [sample("a", 1)])
    out = tmp_path / "out"
    out.mkdir()
    stale = ["a.tar.tmp12345", "a.tar.json.tmp12345"]
    for name in stale:
        (out / name).write_bytes(b"partial")
    (out / "a.tar.tmp1.tar").write_bytes(b"not ours: the output of an input named a.tar.tmp1.tar")
    assert precompute(vae, tmp_path / "a.tar", out) == 0
    assert temp_files(out) == ["a.tar.tmp1.tar"]

    for name in stale:  # left by a run killed after this shard was done: the rerun skips it, and cleans up
        (out / name).write_bytes(b"partial")
    assert precompute(vae, tmp_path / "a.tar", out) == 0
    assert temp_files(out) == ["a.tar.tmp1.tar"] and read_manifest(out)["counts"]["written"] == 1


def test_a_rerun_redoes_an_input_shard_that_changed(vae, tmp_path, capsys):
    """The input replaced by other samples after its latent shard was written: 1 sample became 3."""
    shard, out = tmp_path / "a.tar", tmp_path / "out"
    write_tar(shard, [sample("k0", 1)])
    assert precompute(vae, shard, out) == 0 and read_manifest(out)["counts"]["written"] == 1
    write_tar(shard, [sample(f"k{i}", 1, i) for i in range(3)])
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # even on a coarse clock
    assert precompute(vae, shard, out) == 0
    assert read_manifest(out)["counts"]["written"] == 3
    assert f"{shard} changed since a.tar was written from it (size or modification time): redoing it" in \
        capsys.readouterr().err
    assert precompute(vae, shard, out) == 0 and "(1 already done)" in capsys.readouterr().out  # unchanged: skipped


@pytest.mark.slow
def test_failed_write_leaves_no_temp_file(vae, tmp_path):
    """A real OSError mid-shard: files may grow to 50 kB, one latent record is about 34 kB."""
    write_tar(tmp_path / "a.tar", [sample(f"k{i}", 1, i) for i in range(3)])
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "precompute_latents.py"), "--input", str(tmp_path / "a.tar"),
           "--out", str(out), "--resolution", "256", "--vae", str(vae), "--batch-size", "4", "--workers", "1",
           "--device", "cpu", "--decoder", "pil"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: file too large on "), proc.stderr
    assert proc.stderr.strip().endswith(f"writing {out / 'a.tar'}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []

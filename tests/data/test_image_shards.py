import pytest

from ditmoe.data.image_shards import ImageShardReader, expand_shards
from ditmoe.data.synthetic import write_tar


def make(path, n=4):  # 4608 bytes a sample: 512 + 3072 (jpg), 512 + 512 (cls)
    write_tar(path, [(f"d/k{i}", {"jpg": bytes([i]) * 3000, "cls": str(i).encode()}) for i in range(n)])
    return path.read_bytes()


def read(path):
    reader = ImageShardReader(path)
    return [(s.key, sorted(s.fields), s.error) for s in reader], reader.error


def test_groups_members_by_key(tmp_path):
    make(tmp_path / "a.tar")
    samples, error = read(tmp_path / "a.tar")
    assert samples == [(f"d/k{i}", ["cls", "jpg"], None) for i in range(4)] and error is None


def test_truncated_inside_a_sample_flags_that_sample(tmp_path):
    data = make(tmp_path / "a.tar")
    (tmp_path / "a.tar").write_bytes(data[: 2 * 4608 + 1000])  # inside the image of k2
    samples, error = read(tmp_path / "a.tar")
    assert [s[0] for s in samples] == ["d/k0", "d/k1", "d/k2"]
    assert samples[0][2] is None and samples[1][2] is None and "cut short" in samples[2][2] and error is None


def test_truncated_between_samples_is_a_shard_error(tmp_path):
    data = make(tmp_path / "a.tar")
    (tmp_path / "a.tar").write_bytes(data[: 2 * 4608 + 100])  # inside the header of k2's first member
    samples, error = read(tmp_path / "a.tar")
    assert [s[0] for s in samples] == ["d/k0", "d/k1"] and "cut short" in error


def test_not_a_tar(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    assert read(tmp_path / "a.tar") == ([], "unreadable tar: empty file")


def test_expand_shards(tmp_path):
    for i in range(3):
        make(tmp_path / f"x-{i:03d}.tar", 1)
    paths = expand_shards([str(tmp_path / "x-{000..002}.tar")])
    assert [p.name for p in paths] == ["x-000.tar", "x-001.tar", "x-002.tar"]
    with pytest.raises(FileNotFoundError, match="x-003.tar"):
        expand_shards([str(tmp_path / "x-{000..003}.tar")])

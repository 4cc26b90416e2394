"""ditmoe.npz: the streaming writer makes np.savez-compatible files; the reader streams .npy 1.0 and 2.0 members."""

import io
import zipfile

import numpy as np
import pytest

from ditmoe.npz import NpzWriter, npz_keys, open_array, write_npy_header


def test_writer_matches_savez(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    with NpzWriter(tmp_path / "out" / "s.npz") as npz:
        npz.add_chunks("arr_0", images.shape, np.uint8, [images[:3], images[3:6], images[6:]])
        npz.add("arr_1", labels)
    data = np.load(tmp_path / "out" / "s.npz")
    assert data.files == ["arr_0", "arr_1"]
    assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.npz"]


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="s.npz: arr_0 got 2 rows, its header says 3"):
        with NpzWriter(path) as npz:
            npz.add_chunks("arr_0", (3, 2), np.uint8, [np.zeros((2, 2), np.uint8)])
    with pytest.raises(RuntimeError):
        with NpzWriter(path) as npz:
            npz.add("arr_0", np.zeros(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def npz_with_header_version(path, array, version):
    """An npz whose arr_0 member has a .npy header of ``version``."""
    member = io.BytesIO()
    np.lib.format.write_array(member, array, version=version)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", member.getvalue())


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_reader_streams_both_header_versions(tmp_path, version):
    array = np.arange(5 * 6, dtype=np.int32).reshape(5, 2, 3)
    npz_with_header_version(tmp_path / "a.npz", array, version)
    with open_array(tmp_path / "a.npz") as stream:
        assert stream.shape == (5, 2, 3) and stream.dtype == np.int32 and not stream.fortran_order
        batches = list(stream.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate(batches), array)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.npz: no such file"):
        npz_keys(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("text")
    with pytest.raises(ValueError, match="text.npz: not an .npz file"):
        npz_keys(tmp_path / "text.npz")
    np.savez(tmp_path / "b.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match=r"b.npz: no arr_0 array \(it has images\)"):
        with open_array(tmp_path / "b.npz"):
            pass
    npz_with_header_version(tmp_path / "f.npz", np.asfortranarray(np.zeros((3, 2))), (1, 0))
    with open_array(tmp_path / "f.npz") as stream:
        with pytest.raises(ValueError, match="f.npz: arr_0 is stored in Fortran order"):
            next(stream.batches(1))


def test_reader_detects_truncated_arrays(tmp_path):
    member = io.BytesIO()
    write_npy_header(member, (4, 3), np.uint8)
    member.write(bytes(10))  # 12 bytes promised
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as archive:
        archive.writestr("arr_0.npy", member.getvalue())
    with open_array(tmp_path / "t.npz") as stream:
        with pytest.raises(ValueError, match="t.npz: arr_0 is truncated"):
            list(stream.batches(3))

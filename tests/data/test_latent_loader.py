import json
from itertools import islice

import numpy as np
import pytest
import torch

from ditmoe.data import CorruptShardError, LatentLoader, ManifestError
from ditmoe.data.latent_format import ShardWriter

from latent_fixtures import make_dataset_fixture  # noqa: F401 (pytest fixture)


def take(loader, n):
    return list(islice(iter(loader), n))


def ids(batch):
    """Sample indices of a batch from ``make_dataset`` (mean i, flip view -i, std 0)."""
    return batch[0][:, 0, 0, 0].abs().round().long().tolist()


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shapes_and_metadata(make_dataset):
    loader = LatentLoader(make_dataset(n=50), 4, seed=0)
    assert loader.latent_shape == (2, 4, 4) and loader.num_classes == 10 and loader.num_samples == 50
    x, y = next(iter(loader))
    assert x.shape == (4, 2, 4, 4) and x.dtype == torch.float32 and y.shape == (4,) and y.dtype == torch.int64
    assert y.tolist() == [i % 10 for i in ids((x, y))]


def test_epoch_covers_each_sample_once_and_reshuffles(make_dataset):
    loader = LatentLoader(make_dataset(n=50), 4, seed=3)
    assert loader.batches_per_epoch == 12
    batches = take(loader, 24)
    first = [i for b in batches[:12] for i in ids(b)]
    second = [i for b in batches[12:] for i in ids(b)]
    assert len(set(first)) == 48 and len(set(second)) == 48 and first != second
    assert json.loads(json.dumps(loader.state_dict()))["epoch"] == 2


def test_deterministic_and_seed_dependent(make_dataset):
    root = make_dataset(n=50, std=1.0)
    a, b = take(LatentLoader(root, 5, seed=1), 6), take(LatentLoader(root, 5, seed=1), 6)
    assert_same(a, b)
    c = take(LatentLoader(root, 5, seed=2), 6)
    assert not torch.equal(a[0][0], c[0][0])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_epoch_exactly(make_dataset, world_size):
    root = make_dataset(n=50)
    per_rank = 50 // world_size // 4
    seen = []
    for rank in range(world_size):
        loader = LatentLoader(root, 4, seed=7, rank=rank, world_size=world_size)
        assert loader.batches_per_epoch == per_rank
        seen += [i for b in take(loader, per_rank) for i in ids(b)]
    assert len(seen) == len(set(seen)) == world_size * per_rank * 4


def test_workers_give_the_same_batches(make_dataset):
    root = make_dataset(n=40, std=1.0)
    ref = take(LatentLoader(root, 3, seed=5), 30)  # crosses two epoch ends
    assert_same(take(LatentLoader(root, 3, seed=5, num_workers=2), 30), ref)


def test_resume_gives_the_same_batches(make_dataset):
    root = make_dataset(n=40, std=1.0)
    loader = LatentLoader(root, 3, seed=9, num_workers=2)
    it = iter(loader)
    head = list(islice(it, 11))
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 11 and state["samples_consumed_in_epoch"] == 33
    tail = list(islice(it, 7))
    resumed = LatentLoader(root, 3, seed=9)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 7), tail)
    assert_same(take(LatentLoader(root, 3, seed=9), 18), head + tail)
    with pytest.raises(ValueError, match="global_batch_size=3, this loader 4"):
        LatentLoader(root, 4, seed=9).load_state_dict(state)


def test_resume_under_another_world_size(make_dataset):
    """Same global batch, 2 ranks × 3 -> 1 rank × 6: the same samples, rank r's at r::2."""
    root = make_dataset(n=40, std=1.0)
    ranks = [LatentLoader(root, 3, seed=9, rank=r, world_size=2) for r in range(2)]
    its = [iter(loader) for loader in ranks]
    for it in its:
        list(islice(it, 4))
    state = json.loads(json.dumps(ranks[0].state_dict()))
    tails = [list(islice(it, 5)) for it in its]
    single = LatentLoader(root, 6, seed=9)
    single.load_state_dict(state)
    for b, (x, y) in enumerate(take(single, 5)):
        for r in range(2):
            assert torch.equal(x[r::2], tails[r][b][0]) and torch.equal(y[r::2], tails[r][b][1])
    with pytest.raises(ValueError, match="global_batch_size=6, this loader 4"):
        LatentLoader(root, 2, seed=9, rank=0, world_size=2).load_state_dict(state)


def test_flip_and_noise_come_from_the_sample(make_dataset):
    root = make_dataset(n=48, std=1.0, scaling_factor=0.5)
    draws = {}  # sample index -> rows drawn for it; the same for any world size / batch size
    for world_size, batch_size in [(1, 4), (2, 3)]:
        for rank in range(world_size):
            loader = LatentLoader(root, batch_size, seed=11, rank=rank, world_size=world_size)
            for x, _ in take(loader, loader.batches_per_epoch):
                for row in x:
                    draws.setdefault(round(abs(row.mean().item()) / 0.5), []).append(row)
    assert sorted(draws) == list(range(48))
    flips = 0
    for index, (row, again) in draws.items():
        assert torch.equal(row, again)
        flipped = bool(row.mean() < 0)
        flips += flipped
        eps = row / 0.5 - (-index if flipped else index)  # x = (mean + std * eps) * scaling_factor
        assert 0.6 < eps.std().item() < 1.4 and abs(eps.mean().item()) < 0.6
    assert 10 < flips < 38


def test_no_flip_dataset_never_flips(make_dataset):
    loader = LatentLoader(make_dataset(n=20, flip=False), 4, seed=0)
    assert all((x >= 0).all() for x, _ in take(loader, 10))


def test_checksum_mismatch_is_an_error_naming_the_shard(make_dataset):
    root = make_dataset(n=50)
    path = root / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[-12000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="shard-000002.tar: sha256 checksum mismatch"):
        LatentLoader(root, 4, seed=0)
    LatentLoader(root, 4, seed=0, rank=1, world_size=2)  # checksums of other ranks' shards are theirs to check
    (root / "shard-000003.tar").unlink()
    with pytest.raises(ManifestError, match="shard-000003.tar listed in manifest.json is missing"):
        LatentLoader(root, 4, seed=0, rank=1, world_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_at_train_time_names_shard_and_key(make_dataset, num_workers):
    root = make_dataset(n=16, samples_per_shard=8)
    record = json.loads((root / "manifest.json").read_text())["record_bytes"]
    path = root / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[3 * record + 2 * 512 + 3] = ord("X")  # mangle the latent member name of sample 3 -> bad header
    path.write_bytes(bytes(data))
    loader = LatentLoader(root, 4, seed=0, verify="size", num_workers=num_workers)
    with pytest.raises(CorruptShardError, match=r"shard-000001.tar: sample #3 \(key '000000011'\)"):
        take(loader, 4)


def test_empty_shards_are_skipped(make_dataset):
    root = make_dataset(n=12, samples_per_shard=4)
    manifest = json.loads((root / "manifest.json").read_text())
    for i, name in [(0, "empty-a.tar"), (2, "empty-b.tar"), (5, "empty-c.tar")]:
        with ShardWriter(root / name) as w:
            manifest["shards"].insert(i, w.close())
    (root / "manifest.json").write_text(json.dumps(manifest))
    loader = LatentLoader(root, 4, seed=0)
    assert sorted(i for b in take(loader, 3) for i in ids(b)) == list(range(12))


def test_rejects_bad_arguments(make_dataset):
    root = make_dataset(n=10)
    with pytest.raises(ValueError, match="fewer than world_size"):
        LatentLoader(root, 6, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        LatentLoader(root, 1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        LatentLoader(root, 1, seed=-1)
    with pytest.raises(ManifestError, match="no manifest"):
        LatentLoader(root / "nope", 1, seed=0)


def test_identity_latents_pass_through(tmp_path):
    from ditmoe.data import write_latent_dataset

    images = np.random.default_rng(0).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float16)
    write_latent_dataset(tmp_path, images, 0, np.arange(12) % 3, resolution=8)
    (x, y), = take(LatentLoader(tmp_path, 12, seed=0), 1)
    order = np.argsort([np.abs(images.astype(np.float32) - r.numpy()).sum(axis=(1, 2, 3)).argmin() for r in x])
    assert torch.equal(x[order], torch.from_numpy(images.astype(np.float32)))
    assert torch.equal(y[order], torch.arange(12) % 3)

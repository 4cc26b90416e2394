"""Pinned batches on CUDA machines: the default follows CUDA, and pinning keeps the batch order."""

from itertools import islice

import pytest
import torch

from ditmoe.data import LatentLoader, latent_loader

from latent_fixtures import make_dataset_fixture  # noqa: F401 (pytest fixture)


def take(loader, n):
    return list(islice(iter(loader), n))


def test_pinning_follows_cuda(make_dataset, monkeypatch):
    root = make_dataset(n=20)
    assert LatentLoader(root, 4, seed=0).pin_memory == torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert LatentLoader(root, 4, seed=0).pin_memory
    assert not LatentLoader(root, 4, seed=0, pin_memory=False).pin_memory


def test_in_process_batches_are_pinned_in_order(make_dataset, monkeypatch):
    """Without workers each batch goes through ``_pinned`` (a marker here: this machine may have no CUDA)."""
    root = make_dataset(n=40, std=1.0)
    pinned = []
    monkeypatch.setattr(latent_loader, "_pinned", lambda batch: pinned.append(batch) or batch)
    batches = take(LatentLoader(root, 3, seed=5, pin_memory=True), 15)
    assert len(pinned) == 15 and all(a is b for a, b in zip(pinned, batches))
    for (x, y), (rx, ry) in zip(batches, take(LatentLoader(root, 3, seed=5, pin_memory=False), 15)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_worker_batches_keep_their_order_when_pinned(make_dataset):
    root = make_dataset(n=40, std=1.0)
    ref = take(LatentLoader(root, 3, seed=5, pin_memory=False), 20)
    got = take(LatentLoader(root, 3, seed=5, num_workers=2, pin_memory=True), 20)
    for (x, y), (rx, ry) in zip(got, ref):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert x.is_pinned() == torch.cuda.is_available()

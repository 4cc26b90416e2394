"""Fixtures for the latent format and loader tests (import them; not a conftest, whose module
name ``conftest`` other test directories import)."""

import numpy as np
import pytest

from ditmoe.data import write_latent_dataset


def indexed_latents(n, shape=(2, 4, 4), flip=True, std=0.0):
    """Latents whose mean is the sample index everywhere (and minus it for the flip view)."""
    mean = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, *shape))
    kw = dict(mean_flip=-mean, std_flip=std) if flip else {}
    return mean, kw


@pytest.fixture(name="make_dataset")
def make_dataset_fixture(tmp_path):
    """``make_dataset(n, samples_per_shard, ...) -> root`` of a dataset whose sample i has mean i."""
    def make(n=50, samples_per_shard=8, flip=True, std=0.0, scaling_factor=1.0, name="latents"):
        mean, kw = indexed_latents(n, flip=flip, std=std)
        root = tmp_path / name
        write_latent_dataset(root, mean, std, np.arange(n) % 10, scaling_factor=scaling_factor,
                             resolution=32, samples_per_shard=samples_per_shard, **kw)
        return root
    return make

"""Linear beta schedule and timestep respacing."""

import numpy as np
import pytest

from ditmoe.diffusion.schedule import linear_betas, respace, space_timesteps


def test_linear_betas_endpoints_and_length():
    betas = linear_betas()
    assert betas.dtype == np.float64
    assert betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.all(np.diff(betas) > 0)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_even_respacing_250_of_1000():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250
    assert kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}
    ideal = np.arange(250) * 999 / 249
    assert np.max(np.abs(np.array(kept) - ideal)) <= 0.5 + 1e-9


def test_sectioned_respacing():
    kept = space_timesteps(100, "10,20")
    assert len(kept) == 30
    first, second = kept[:10], kept[10:]
    assert first[0] == 0 and first[-1] == 49
    assert second[0] == 50 and second[-1] == 99
    assert set(np.diff(second)) <= {2, 3}


def test_ddim_striding():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "ddim30")
    assert len(kept) == 30 and kept == list(range(0, 1000, 34))


@pytest.mark.parametrize("spec", ["ddim999", "2000", "0"])
def test_impossible_specs_raise(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,5,1"])
def test_respaced_alphas_cumprod_match_original(spec):
    betas = linear_betas()
    kept, new_betas = respace(betas, spec)
    assert kept.dtype == np.int64 and len(kept) == len(new_betas)
    original = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(np.cumprod(1.0 - new_betas), original[kept], rtol=1e-12)
    assert np.all((new_betas > 0) & (new_betas < 1))

"""The validation loss: stratified over diffusion time, fixed noise, the same value on one rank and on two."""

import pytest
import torch

from ditmoe.diffusion import build_objective
from ditmoe.train.validation import NUM_BUCKETS, ValidationLoss, item_timesteps

from conftest import SMALL_DIGITS, eval_records, run_cli, torchrun


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_every_sample_is_noised_once_in_each_band_of_diffusion_time(objective):
    diffusion = build_objective(objective)
    x, y = torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.int64)
    loss = ValidationLoss(x, y, diffusion, seed=0, batch_size=7, rank=0, world=1, device="cpu")
    assert loss.samples.tolist() == [i for i in range(5) for _ in range(NUM_BUCKETS)]
    span = diffusion.num_timesteps if objective == "ddpm" else 1.0
    band = (loss.t.double() / span * NUM_BUCKETS).floor().long()
    assert band.tolist() == loss.bands.tolist() == list(range(NUM_BUCKETS)) * 5
    assert len(set(loss.t.tolist())) == 5 * NUM_BUCKETS  # random within its band, not the band's centre
    again = ValidationLoss(x, y, diffusion, seed=0, batch_size=3, rank=1, world=2, device="cpu")
    assert torch.equal(again.t, loss.t) and torch.equal(again.noise, loss.noise)  # seed alone fixes them
    other = ValidationLoss(x, y, diffusion, seed=1, batch_size=7, rank=0, world=1, device="cpu")
    assert not torch.equal(other.noise, loss.noise)


def test_ddpm_bands_cover_every_timestep_range():
    diffusion = build_objective("ddpm")
    fractions = torch.tensor([0.0, 0.1249, 0.125, 0.9999])
    assert item_timesteps(diffusion, fractions).tolist() == [0, 124, 125, 999]


@pytest.mark.slow
def test_validation_loss_is_the_same_on_one_rank_and_on_two(tmp_path):
    """lr 0 keeps the weights of both runs equal; 23 fixed batches of 64 items split 12 + 11 over two ranks."""
    args = ["--set", "lr=0", "--set", "eval_every=2", "--set", "val_batch_size=64", "--steps", "2", "--seed", "3"]
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, *args, "--out", str(tmp_path / "one")], env={"OMP_NUM_THREADS": "1"})
    torchrun(tmp_path / "two", *args)
    one, two = eval_records(tmp_path / "one"), eval_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2]
    values = {k: v for k, v in one[0].items() if k.startswith("val")}
    assert len(values) == 2 * (2 + NUM_BUCKETS)
    assert values == {k: v for k, v in two[0].items() if k.startswith("val")}
    assert values["val/loss"] == values["val_ema/loss"]  # lr 0: the EMA of unchanged weights is those weights
    bands = [values[f"val/loss/t{b}"] for b in range(NUM_BUCKETS)]
    assert values["val/loss"] == pytest.approx(sum(bands) / NUM_BUCKETS, rel=1e-12)

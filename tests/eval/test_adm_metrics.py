"""ADM's metrics against closed forms: Fréchet distance of Gaussians, Inception Score of constructed
predictions, k-NN precision/recall of constructed feature sets."""

import numpy as np
import pytest
import torch

from ditmoe.eval.adm_metrics import inception_score, knn_radii, precision_recall, squared_distances
from ditmoe.eval.frechet import feature_statistics, frechet_distance


def test_frechet_distance_1d_is_mean_and_std_gaps():
    # (m1 - m2)^2 + (s1 - s2)^2 for N(1.5, 2^2) and N(-0.5, 3^2)
    assert frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[9.0]])) == \
        pytest.approx(4.0 + 1.0)


def test_frechet_distance_of_rotated_diagonal_gaussians():
    std1, std2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.5, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)  # 9 + 10
    assert frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2)) == pytest.approx(expected)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    rotated = frechet_distance(rotation @ mu1, rotation @ np.diag(std1**2) @ rotation.T,
                               rotation @ mu2, rotation @ np.diag(std2**2) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero_even_when_singular():
    x = np.random.default_rng(1).normal(size=(5, 12))  # rank-4 covariance in 12 dimensions
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_feature_statistics_converge_to_the_sampling_gaussian():
    rng = np.random.default_rng(2)
    mu = np.array([1.0, -2.0, 0.5])
    factor = np.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.4, 0.7]])
    sigma = factor @ factor.T
    x = rng.normal(size=(200_000, 3)) @ factor.T + mu
    est_mu, est_sigma = feature_statistics(x)
    assert np.abs(est_mu - mu).max() < 0.02 and np.abs(est_sigma - sigma).max() < 0.05
    assert frechet_distance(est_mu, est_sigma, mu, sigma) < 1e-3


def test_inception_score_of_balanced_one_hot_predictions_is_the_class_count():
    probs = np.eye(7)[np.arange(70) % 7]
    assert inception_score(probs) == pytest.approx(7.0)


def test_inception_score_of_identical_predictions_is_one():
    probs = np.tile(np.random.default_rng(3).dirichlet(np.ones(10)), (50, 1))
    assert inception_score(probs) == pytest.approx(1.0)


def test_inception_score_averages_consecutive_splits():
    probs = np.concatenate([np.eye(4)[np.arange(8) % 4], np.eye(4)[np.arange(8) % 2]])  # 4 classes, then 2
    assert inception_score(probs, split_size=8) == pytest.approx((4 + 2) / 2)
    # one split: p(y) = (3/8, 3/8, 1/8, 1/8); IS = exp(mean -log p(y_i)) = (8/3)^(3/4) * 8^(1/4)
    assert inception_score(probs, split_size=16) == pytest.approx((8 / 3) ** 0.75 * 8**0.25)
    # splits of 10 and 6 rows: the last, shorter split counts as much as the first
    first, last = probs[:10], probs[10:]
    assert inception_score(probs, split_size=10) == pytest.approx(
        (inception_score(first) + inception_score(last)) / 2)
    assert inception_score(last) == pytest.approx(2.0)


def test_knn_radius_is_the_kth_nearest_other_point():
    points = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    # third-nearest other point: 0 -> 7, 1 -> 7, 3 -> 7, 7 -> 0, 15 -> 1 (squared distances)
    assert knn_radii(points, k=3).tolist() == [49.0, 36.0, 16.0, 49.0, 196.0]
    assert knn_radii(points, k=1).tolist() == [1.0, 1.0, 4.0, 16.0, 64.0]
    with pytest.raises(ValueError, match="more than 3 feature vectors"):
        knn_radii(points[:3], k=3)


def test_precision_counts_samples_inside_some_reference_ball_boundary_included():
    ref = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    samples = np.array([[-7.0], [-7.5], [40.0], [41.0]])  # -7 is on the boundary of 0's ball (radius 7)
    precision, recall = precision_recall(ref, samples, k=3)
    assert precision == 0.25
    # recall is precision with the roles swapped
    assert precision_recall(samples, ref, k=3) == (recall, precision)


def test_precision_recall_of_identical_sets_is_one():
    feats = np.random.default_rng(4).normal(size=(60, 32))
    assert precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clusters_is_zero():
    rng = np.random.default_rng(5)
    ref, samples = rng.normal(size=(40, 16)), rng.normal(size=(40, 16)) + 50.0
    assert precision_recall(ref, samples) == (0.0, 0.0)


def test_samples_covering_half_the_modes_have_full_precision_and_half_recall():
    rng = np.random.default_rng(6)
    centres = 20.0 * np.eye(4, 16)
    ref = np.concatenate([c + rng.normal(size=(25, 16)) for c in centres])  # 4 modes of 25
    samples = ref[:50] + 1e-3 * rng.normal(size=(50, 16))  # jittered copies of modes 0 and 1
    assert precision_recall(ref, samples) == (1.0, 0.5)


def test_precision_recall_do_not_depend_on_the_batch_size():
    rng = np.random.default_rng(7)
    ref, samples = rng.normal(size=(90, 8)), 0.8 * rng.normal(size=(70, 8)) + 0.5
    whole = precision_recall(ref, samples, batch_size=1000)
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0
    assert precision_recall(ref, samples, batch_size=16) == whole
    assert torch.equal(knn_radii(ref, batch_size=7), knn_radii(ref, batch_size=1000))


def test_squared_distances_round_like_float16_and_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(8)
    u, v = rng.normal(size=(20, 64)), rng.normal(size=(30, 64))
    exact = ((u[:, None] - v[None]) ** 2).sum(-1)
    small = squared_distances(torch.tensor(u, dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
    assert np.allclose(small.numpy(), exact, rtol=2e-2) and not np.allclose(small.numpy(), exact, rtol=1e-5)
    assert torch.equal(small, small.half().float())
    # norms of 1e6 overflow float16 (max 65504): float32 throughout
    big = squared_distances(torch.tensor(1e3 * u, dtype=torch.float32), torch.tensor(1e3 * v, dtype=torch.float32))
    assert np.allclose(big.numpy(), 1e6 * exact, rtol=1e-4)

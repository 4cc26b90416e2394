"""Digits metrics: the feature-space FID against the real digits, beside conditional accuracy."""

import numpy as np
import pytest

from ditmoe.data.digits import digits_arrays
from ditmoe.eval.digits import (
    conditional_accuracy,
    digits_features,
    digits_fid,
    digits_quality,
    diversity,
    pixel_fd,
    real_pixel_fd_floor,
    train_digits_classifier,
    train_digits_feature_extractor,
    within_class_variance,
)
from ditmoe.eval.frechet import feature_statistics, frechet_distance

pytestmark = pytest.mark.slow  # its fixtures take seconds: trainings, whole commands or fitted models


@pytest.fixture(scope="module")
def extractor():
    return train_digits_feature_extractor()


@pytest.fixture(scope="module")
def digits():
    return digits_arrays()


def test_features_are_deterministic(extractor, digits):
    images, _ = digits
    first = digits_features(images, extractor)
    assert first.shape == (1797, 64) and np.abs(first).max() < 1
    np.testing.assert_array_equal(digits_features(images, train_digits_feature_extractor()), first)


def test_real_digits_score_near_zero(extractor, digits):
    images, _ = digits
    assert abs(digits_fid(images, extractor)) < 1e-6
    half = np.random.default_rng(0).permutation(len(images))[:898]
    rest = np.setdiff1d(np.arange(len(images)), half)
    assert digits_fid(images[half], extractor) < 0.1
    between_halves = frechet_distance(*feature_statistics(digits_features(images[half], extractor)),
                                      *feature_statistics(digits_features(images[rest], extractor)))
    assert 0.05 < between_halves < 0.3


def test_noise_missing_classes_and_collapse_score_high(extractor, digits):
    images, labels = digits
    noise = np.random.default_rng(0).uniform(0, 16, size=(1000, 8, 8))
    assert digits_fid(noise, extractor) > 5
    assert digits_fid(images[labels != 0], extractor) > 0.5  # one class missing
    zeros = images[labels == 0]  # real images, perfectly conditioned, but a single class
    assert digits_fid(zeros, extractor) > 20
    assert conditional_accuracy(zeros, np.zeros(len(zeros), dtype=np.int64)) == 1.0


def test_labels_do_not_matter(extractor, digits):
    images, labels = digits
    order = np.random.default_rng(1).permutation(len(images))
    assert digits_fid(images[order], extractor) == pytest.approx(digits_fid(images, extractor), abs=1e-9)
    # cond_accuracy, by contrast, depends on the labels: shuffled ones are right about 1 time in 10.
    classifier = train_digits_classifier()
    assert conditional_accuracy(images, labels, classifier) == 1.0
    assert conditional_accuracy(images, labels[order], classifier) < 0.2


def _digits(columns: dict[int, list[float]], n: int = 4) -> np.ndarray:
    """(n, 8, 8) digits whose pixel k (row-major) takes ``columns[k]`` (in [0, 16]) and 0 elsewhere."""
    flat = np.zeros((n, 64))
    for k, values in columns.items():
        flat[:, k] = values
    return flat.reshape(n, 8, 8)


def test_pixel_fd_matches_a_hand_computation():
    """Pixels scaled to [0, 1]: a = (0, 1, 0, 1) has mean 1/2 and unbiased variance 1/3, b = a / 2 mean 1/4 and
    variance 1/12; with every other pixel 0 the distance is (1/2 - 1/4)^2 + 1/3 + 1/12 - 2 sqrt(1/36) = 7/48."""
    a = _digits({0: [0, 16, 0, 16]})
    b = _digits({0: [0, 8, 0, 8]})
    assert pixel_fd(a, b) == pytest.approx(7 / 48, rel=1e-9)
    # two independent pixels against constant images of 4 (1/4 everywhere, no variance):
    # 62 pixels at (0 - 1/4)^2, two at (1/2 - 1/4)^2, plus the two variances of 1/3
    two = _digits({0: [0, 16, 0, 16], 1: [0, 0, 16, 16]})
    constant = np.full((4, 8, 8), 4.0)
    assert pixel_fd(two, constant) == pytest.approx(62 / 16 + 2 / 16 + 2 / 3, rel=1e-9)
    assert pixel_fd(two, two) == pytest.approx(0.0, abs=1e-9)


def test_diversity_is_the_within_class_variance_ratio():
    real, labels = digits_arrays()
    assert diversity(real, labels) == pytest.approx(1.0)
    # class 0: pixel 0 is (0, 1) -> variance 1/4 over 64 pixels; class 1: constant -> 0; mean over the classes 1/512
    pixels = _digits({0: [0, 16, 5, 5]})
    assert within_class_variance(pixels, np.array([0, 0, 1, 1])) == pytest.approx(1 / 512)
    prototypes = np.stack([real[labels == c].mean(axis=0) for c in labels])  # every sample its class mean
    assert diversity(prototypes, labels) == pytest.approx(0.0, abs=1e-12)


def test_the_real_digits_floor_and_quality_of_real_digits():
    real, labels = digits_arrays()
    floor = real_pixel_fd_floor()
    assert floor == pytest.approx(0.064, abs=0.001)  # two random halves of the real digits
    quality = digits_quality(real[::2].astype(float), labels[::2])
    assert quality["pixel_fd_real_floor"] == floor
    assert quality["cond_accuracy"] > 0.99 and quality["pixel_fd"] < floor and 0.95 < quality["diversity"] < 1.05

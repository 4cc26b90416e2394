"""Digits metrics: the feature-space FID against the real digits, beside conditional accuracy."""

import numpy as np
import pytest

from ditmoe.data.digits import digits_arrays
from ditmoe.eval.digits import (
    conditional_accuracy,
    digits_features,
    digits_fid,
    train_digits_classifier,
    train_digits_feature_extractor,
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

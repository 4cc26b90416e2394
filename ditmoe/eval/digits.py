"""Digits demo metrics.

* ``conditional_accuracy``: an independent classifier trained on the real digits judges whether each
  generated image shows the class it was conditioned on.
* ``digits_fid``: a feature-space FID against all 1797 real digits. The features play Inception's role:
  the 64 tanh hidden units of a seeded one-hidden-layer MLP classifier trained on the real digits
  (L-BFGS, so the result is deterministic; ~94% accurate under 5-fold cross-validation). The score uses
  pixels only, so unlike ``conditional_accuracy`` it ignores labels, and it penalises missing classes
  and a lack of diversity. Scale: a random half of the real digits scores 0.04 against all of them
  (0.15 against the other half), the real digits without the 0s 0.8, a three-pixel horizontal blur
  4.0, uniform-noise images 10 and the real 0s alone 32.
* ``digits_quality``: the demo's headline numbers, fidelity and diversity side by side: ``cond_accuracy``,
  ``pixel_fd`` (Fréchet distance on the 64 pixels scaled to [0, 1], against all real digits, with the floor
  of two random halves of the real digits beside it) and ``diversity`` (within-class pixel variance over the
  real digits'). Accuracy alone rewards prototypical samples: strong guidance raises it while FD grows and
  diversity falls.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..data.digits import PIXEL_MAX, digits_arrays
from .frechet import feature_statistics, frechet_distance

if TYPE_CHECKING:
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC


def train_digits_classifier() -> SVC:
    """RBF SVM on all 1797 real digits (pixels in [0, 16]); ~99% accurate under cross-validation."""
    from sklearn.svm import SVC

    images, labels = digits_arrays()
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), -1).astype(np.float64), labels)


def conditional_accuracy(pixels: np.ndarray, labels: np.ndarray, classifier: SVC | None = None) -> float:
    """pixels: (N, 8, 8) in [0, 16]; labels: (N,) the classes the samples were conditioned on."""
    classifier = classifier or train_digits_classifier()
    predicted = classifier.predict(pixels.reshape(len(pixels), -1).astype(np.float64))
    return float((predicted == labels).mean())


def train_digits_feature_extractor() -> MLPClassifier:
    """The seeded MLP (64 tanh hidden units) on all 1797 real digits, pixels scaled to [0, 1]."""
    from sklearn.neural_network import MLPClassifier

    images, labels = digits_arrays()
    mlp = MLPClassifier(hidden_layer_sizes=(64,), activation="tanh", solver="lbfgs", alpha=0.1, max_iter=500,
                        random_state=0)
    return mlp.fit(images.reshape(len(images), -1) / PIXEL_MAX, labels)


def digits_features(pixels: np.ndarray, extractor: MLPClassifier) -> np.ndarray:
    """(N, 8, 8) pixels in [0, 16] -> (N, 64) hidden-layer activations of ``extractor``."""
    x = pixels.reshape(len(pixels), -1).astype(np.float64) / PIXEL_MAX  # (N, 64)
    return np.tanh(x @ extractor.coefs_[0] + extractor.intercepts_[0])


def digits_fid(pixels: np.ndarray, extractor: MLPClassifier | None = None) -> float:
    """Fréchet distance between the features of ``pixels`` (N >= 2, 8, 8) in [0, 16] and of all real digits."""
    extractor = extractor or train_digits_feature_extractor()
    real, _ = digits_arrays()
    return frechet_distance(*feature_statistics(digits_features(pixels, extractor)),
                            *feature_statistics(digits_features(real, extractor)))


def pixel_vectors(pixels: np.ndarray) -> np.ndarray:
    """(N, 8, 8) pixels in [0, 16] -> (N, 64) float64 in [0, 1]."""
    return np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1) / PIXEL_MAX


def pixel_fd(pixels: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the 64 pixels (scaled to [0, 1]) of ``pixels`` and of
    ``reference`` (both (N >= 2, 8, 8) in [0, 16]). Unlike ``digits_fid`` it needs no learned features."""
    return frechet_distance(*feature_statistics(pixel_vectors(pixels)), *feature_statistics(pixel_vectors(reference)))


def real_pixel_fd_floor(seed: int = 0) -> float:
    """``pixel_fd`` between two random halves of the real digits: what a perfect generator scores at that size."""
    real, _ = digits_arrays()
    order = np.random.default_rng(seed).permutation(len(real))
    half = len(real) // 2
    return pixel_fd(real[order[:half]], real[order[half:2 * half]])


def within_class_variance(pixels: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the per-pixel variance (pixels in [0, 1]) within each class present."""
    x, labels = pixel_vectors(pixels), np.asarray(labels)
    return float(np.mean([x[labels == c].var(axis=0).mean() for c in np.unique(labels)]))


def diversity(pixels: np.ndarray, labels: np.ndarray) -> float:
    """Within-class pixel variance of samples conditioned on ``labels`` over that of the real digits:
    1 is as varied as the data, below 1 mode-seeking (e.g. strong guidance), above 1 noisier than the data."""
    real, real_labels = digits_arrays()
    return within_class_variance(pixels, labels) / within_class_variance(real, real_labels)


@functools.cache
def _classifier() -> SVC:
    return train_digits_classifier()


def digits_quality(pixels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The demo's three numbers for samples ``pixels`` (N, 8, 8) conditioned on ``labels`` (N,): accuracy
    (fidelity to the class), pixel FD against all real digits with the real-vs-real floor beside it
    (fidelity to the distribution) and diversity."""
    return {"cond_accuracy": conditional_accuracy(pixels, labels, _classifier()),
            "pixel_fd": pixel_fd(pixels, digits_arrays()[0]), "pixel_fd_real_floor": real_pixel_fd_floor(),
            "diversity": diversity(pixels, labels)}

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
"""

from __future__ import annotations

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

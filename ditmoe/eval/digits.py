"""Conditional accuracy on the digits demo: an independent classifier trained on the real digits
judges whether each generated image shows the class it was conditioned on."""

import numpy as np
from sklearn.svm import SVC

from ..data.digits import digits_arrays


def train_digits_classifier() -> SVC:
    """RBF SVM on all 1797 real digits (pixels in [0, 16]); ~99% accurate under cross-validation."""
    images, labels = digits_arrays()
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), -1).astype(np.float64), labels)


def conditional_accuracy(pixels: np.ndarray, labels: np.ndarray, classifier: SVC | None = None) -> float:
    """pixels: (N, 8, 8) in [0, 16]; labels: (N,) the classes the samples were conditioned on."""
    classifier = classifier or train_digits_classifier()
    predicted = classifier.predict(pixels.reshape(len(pixels), -1).astype(np.float64))
    return float((predicted == labels).mean())

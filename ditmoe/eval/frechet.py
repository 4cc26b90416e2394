"""Fréchet distance between Gaussians fitted to feature sets (the FID formula, computed as ADM does)."""

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) features -> mean (F,) and unbiased covariance (F, F), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N >= 2, F), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of A S2 A with A = S1^(1/2),
    a symmetric positive semi-definite matrix: two symmetric eigendecompositions instead of ADM's
    general matrix square root (the same value; about 10× faster at 2048 dimensions and no retry
    with a diagonal offset for singular covariances).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    root = psd_sqrt(sigma1)  # S1^(1/2)
    product = root @ sigma2 @ root
    trace_covmean = np.sqrt(np.clip(linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 count as 0)."""
    from scipy import linalg

    eigenvalues, eigenvectors = linalg.eigh(sigma)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


class FrechetReference:
    """A reference Gaussian (mu, sigma) that many feature sets are compared with (FID during training).

    ``distance(features)`` is ``frechet_distance(mu, sigma, *feature_statistics(features))`` computed without the
    features' covariance: with X the N centred features and A = sigma^(1/2) (computed once, here), the features'
    covariance is X^T X / (N - 1), so A S2 A = M^T M with M = X A / sqrt(N - 1), whose non-zero eigenvalues are
    those of the N x N matrix M M^T. For N well below the dimension (a few hundred samples against 2048
    features) that is one (N, F) x (F, F) product and an N x N eigendecomposition instead of two F x F ones.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.atleast_1d(mu).astype(np.float64)
        self.sigma = np.atleast_2d(sigma).astype(np.float64)
        if self.sigma.shape != (len(self.mu),) * 2:
            raise ValueError(f"sigma has shape {self.sigma.shape}, expected {(len(self.mu),) * 2} for mu of "
                             f"shape {self.mu.shape}")
        self.sqrt_sigma = psd_sqrt(self.sigma)
        self.trace = float(np.trace(self.sigma))

    def distance(self, features: np.ndarray) -> float:
        """Fréchet distance between the reference and the Gaussian fitted to ``features`` (N >= 2, F)."""
        from scipy import linalg

        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2 or features.shape[1] != len(self.mu):
            raise ValueError(f"features must be (N >= 2, {len(self.mu)}), got shape {features.shape}")
        n, dim = features.shape
        mu = features.mean(axis=0)
        centred = features - mu
        m = centred @ self.sqrt_sigma / np.sqrt(n - 1)  # M^T M = A S2 A
        gram = m @ m.T if n <= dim else m.T @ m
        trace_covmean = np.sqrt(np.clip(linalg.eigvalsh(gram), 0, None)).sum()
        diff = mu - self.mu
        return float(diff.dot(diff) + self.trace + np.einsum("ij,ij->", centred, centred) / (n - 1)
                     - 2 * trace_covmean)

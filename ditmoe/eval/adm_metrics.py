"""Inception Score and k-NN precision/recall as ADM's evaluator computes them (guided-diffusion's
evaluations/evaluator.py; FID and sFID are ``frechet.py`` on the pool and spatial features)."""

import numpy as np
import torch


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean over consecutive splits of ``split_size`` rows (the last may be shorter) of
    exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j))); probs: (N, classes) rows of class probabilities.

    Like ADM, but 0 * log 0 counts as 0 instead of giving NaN.
    """
    from scipy.special import rel_entr

    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be (N >= 1, classes), got shape {probs.shape}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, d), (m, d) float32 -> (n, m) squared Euclidean distances, as ADM's DistanceBlock:
    max(|u|^2 - 2 u.v + |v|^2, 0) with inputs and results rounded to float16 (sums accumulated in
    float32), or in float32 when float16 overflows."""
    u16, v16 = _half(u), _half(v)
    norm_u = _half(_half(u16 * u16).sum(1))[:, None]
    norm_v = _half(_half(v16 * v16).sum(1))[None, :]
    dist = _half(_half(norm_u - 2 * _half(u16 @ v16.T)) + norm_v).clamp_min(0)
    if torch.isfinite(dist).all():
        return dist
    return (u.square().sum(1)[:, None] - 2 * u @ v.T + v.square().sum(1)[None, :]).clamp_min(0)


def knn_radii(features, k: int = 3, batch_size: int = 5000, device="cpu") -> torch.Tensor:
    """(N, d) -> (N,) squared distance from each vector to its k-th nearest neighbour within the set.

    As in ADM, the vector itself (distance 0) is neighbour 0, so k = 3 is the third-nearest other vector.
    Memory is bounded by one batch_size x batch_size block.
    """
    feats = torch.as_tensor(features, dtype=torch.float32, device=device)
    if feats.ndim != 2 or len(feats) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} feature vectors, got shape "
                         f"{tuple(feats.shape)}")
    radii = []
    for rows in feats.split(batch_size):
        nearest = torch.empty(len(rows), 0, device=device)  # (rows, <= k + 1) smallest so far
        for cols in feats.split(batch_size):
            candidates = torch.cat([nearest, squared_distances(rows, cols)], 1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, k: int = 3, batch_size: int = 5000,
                     device="cpu") -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

    Precision: fraction of samples within the k-NN ball (``knn_radii``, boundary included) of some
    reference vector. Recall: fraction of reference vectors within the ball of some sample.
    """
    ref = torch.as_tensor(ref_features, dtype=torch.float32, device=device)
    samples = torch.as_tensor(sample_features, dtype=torch.float32, device=device)
    if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
        raise ValueError(f"features must be (N, d) with the same d, got {tuple(ref.shape)} and {tuple(samples.shape)}")
    ref_radii = knn_radii(ref, k, batch_size, device)
    sample_radii = knn_radii(samples, k, batch_size, device)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(samples), batch_size):
            dist = squared_distances(ref[i:i + batch_size], samples[j:j + batch_size])  # (refs, samples)
            ref_covered[i:i + batch_size] |= (dist <= sample_radii[None, j:j + batch_size]).any(1)
            sample_covered[j:j + batch_size] |= (dist <= ref_radii[i:i + batch_size, None]).any(0)
    return sample_covered.float().mean().item(), ref_covered.float().mean().item()

"""Fréchet distance (FID) and kernel distance (KID) between two sets of features, in float64.

FID (Heusel et al. 2017, eq. 6 / Dowson & Landau 1982): d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½).
The trace of the matrix square root is taken from a symmetric eigen-decomposition rather than from
``scipy.linalg.sqrtm`` of the non-symmetric product S1 S2: the non-zero eigenvalues of S1 S2 are those of the
symmetric PSD matrix M = S1^½ S2 S1^½ (AB and BA share them, with A = S1^½, B = S1^½ S2), so
Tr((S1 S2)^½) = Σ sqrt(eig(M)). ``eigh`` returns real eigenvalues (tiny negative round-off is clipped to 0),
needs no epsilon added to singular covariances (n < D is common: 199 emoji in 2048-d), is several times faster
than ``sqrtm``'s Schur iteration, and S1^½ of the reference is computed once and reused for every model
scored. ``tests/test_evaluation_metrics.py`` checks it against ``sqrtm`` to 1e-6 relative.

KID (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 4 and §5): the unbiased MMD² estimator with the
polynomial kernel k(x, y) = (x·y / D + 1)³, averaged over random subsets of equal size drawn without
replacement (defaults 100 subsets of 1,000, as in their code); the spread over subsets is reported as its std.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of n feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @functools.cached_property
    def sqrt_sigma(self) -> np.ndarray:
        """Symmetric PSD square root S^½ = V diag(sqrt(max(λ, 0))) Vᵀ."""
        eigvals, eigvecs = np.linalg.eigh(self.sigma)
        return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def as_float64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features hold NaN/Inf: the images fed to the extractor were not finite")
    return array


def gaussian_stats(features: np.ndarray | torch.Tensor) -> GaussianStats:
    """(N, D) features -> mean and unbiased covariance (N - 1 in the denominator, as np.cov)."""
    x = as_float64(features)
    if len(x) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(x)}: raise num_samples")
    return GaussianStats(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=len(x))


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Squared Fréchet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma) (FID when both are
    Inception)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}): use one extractor for both"
        )
    root = a.sqrt_sigma  # (D, D)
    m = root @ b.sigma @ root  # (D, D) symmetric PSD, same non-zero spectrum as a.sigma @ b.sigma
    eigvals = np.linalg.eigvalsh((m + m.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigvals, 0, None)).sum())
    diff = a.mu - b.mu
    value = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # a distance; only round-off can make it negative


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two (m, D) samples with k(a, b) = (a·b / D + 1)³ (Bińkowski et al. 2018, eq. 4)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3  # (m, m)
    k_yy = (y @ y.T / d + 1.0) ** 3  # (m, m)
    k_xy = (x @ y.T / d + 1.0) ** 3  # (m, m)
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diag - 2.0 * k_xy.mean())


def kernel_distance(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased polynomial MMD² over ``num_subsets`` subsets of min(subset_size, n)
    each."""
    x, y = as_float64(x), as_float64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ ({x.shape[1]} vs {y.shape[1]}): use one extractor for both")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))

"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models").

Each feature set approximates its data manifold by the union of balls centred on its samples, each ball's
radius the distance to the sample's k-th nearest neighbour within the same set (k = 3 in the paper).

* precision: fraction of generated samples inside the real manifold (sample quality);
* recall: fraction of real samples inside the generated manifold (coverage / diversity).

Pairwise distances are computed in row batches so memory stays O(batch * N) rather than O(N^2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(features: np.ndarray | Tensor, what: str) -> Tensor:
    tensor = torch.as_tensor(features).to(torch.float64)
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contain NaN or inf")
    return tensor


def _pairwise_distances(a: Tensor, b: Tensor) -> Tensor:  # (N, D), (M, D) -> (N, M)
    # The direct difference form avoids the cancellation of |a|^2 + |b|^2 - 2ab for near-identical points,
    # which would make a sample's distance to itself slightly non-zero and flip boundary decisions.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def manifold_radii(features: np.ndarray | Tensor, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Distance from each sample to its k-th nearest other sample, (N,) float64."""
    points = _as_tensor(features, "features")
    if not 1 <= k < len(points):
        raise ValueError(f"k must be in [1, N-1] = [1, {len(points) - 1}], got {k}")
    radii = []
    for start in range(0, len(points), batch_size):
        distances = _pairwise_distances(points[start : start + batch_size], points)
        # Index k, not k-1: the smallest distance in each row is the sample to itself (0).
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(
    queries: Tensor, centres: Tensor, radii: Tensor, batch_size: int
) -> Tensor:  # fraction of queries inside any ball
    inside = []
    for start in range(0, len(queries), batch_size):
        distances = _pairwise_distances(queries[start : start + batch_size], centres)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean()


def precision_recall(
    real_features: np.ndarray | Tensor,
    fake_features: np.ndarray | Tensor,
    feature_name: str,
    k: int = 3,
    batch_size: int = 1024,
) -> dict[str, float | int | str]:
    """Improved precision and recall of ``fake_features`` against ``real_features`` (both (N, D))."""
    real = _as_tensor(real_features, "real features")
    fake = _as_tensor(fake_features, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real_radii = manifold_radii(real, k, batch_size)
    fake_radii = manifold_radii(fake, k, batch_size)
    return {
        "precision": float(_coverage(fake, real, real_radii, batch_size)),
        "recall": float(_coverage(real, fake, fake_radii, batch_size)),
        "pr_n": len(fake),
        "pr_ref_n": len(real),
        "pr_k": k,
        "features": feature_name,
    }

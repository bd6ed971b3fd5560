"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the unbiased estimator of the squared MMD with the cubic polynomial kernel
``k(x, y) = (gamma * x.y + coef) ** degree``, ``gamma = 1 / D``, averaged over random subsets of size m:

    MMD^2_u = [sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2

Unlike FID it is unbiased in the number of samples, so small-sample values are comparable across runs.
:func:`kid_from_features` is the seeded numpy route; :func:`kid_torchmetrics` runs torchmetrics'
``KernelInceptionDistance`` with a custom feature module on the same definition.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldm.metrics.features import FeatureExtractor, to_uint8_nhwc


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> np.ndarray:
    """Kernel matrix (N, M) of ``(gamma * x.y + coef) ** degree`` with ``gamma`` defaulting to 1 / D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> float:
    """Unbiased MMD^2 between equally sized samples x, y (m, D): within-set diagonals are excluded."""
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError(f"need two samples of equal size >= 2, got {len(x)} and {len(y)}")
    k_xx = polynomial_kernel(x, x, degree, gamma, coef)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def _validate_kid_args(subsets: int, subset_size: int, n_real: int, n_fake: int) -> int:
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    # Small evaluations (e.g. a few hundred samples during training) shrink the subset rather than fail;
    # the size actually used is reported next to the value.
    size = min(subset_size, n_real, n_fake)
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {n_real} and {n_fake}")
    return size


def kid_from_features(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    feature_name: str,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """KID mean and std over ``subsets`` random subsets, drawn without replacement with a seeded RNG."""
    real = np.asarray(real_features, dtype=np.float64)
    fake = np.asarray(fake_features, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {real.shape} and {fake.shape}")
    size = _validate_kid_args(subsets, subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                real[rng.choice(len(real), size, replace=False)],
                fake[rng.choice(len(fake), size, replace=False)],
                degree,
                gamma,
                coef,
            )
            for _ in range(subsets)
        ]
    )
    return {
        "kid_mean": float(values.mean()),
        "kid_std": float(values.std()),
        "kid_n": len(fake),
        "kid_ref_n": len(real),
        "kid_subsets": subsets,
        "kid_subset_size": size,
        "features": feature_name,
    }


def kid_torchmetrics(
    extractor: FeatureExtractor,
    fake_images: np.ndarray | Tensor,
    reference_features: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float | int | str]:
    """KID via torchmetrics' KernelInceptionDistance, with cached reference features as its real state."""
    images = to_uint8_nhwc(fake_images)
    fake = extractor.extract(images, batch_size=batch_size)
    return kid_torchmetrics_features(extractor, fake, reference_features, subsets, subset_size, seed)


def kid_torchmetrics_features(
    extractor: FeatureExtractor,
    fake_features: np.ndarray | Tensor,
    reference_features: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """KID of features already taken with ``extractor`` (its name goes in the report), on torchmetrics'
    KernelInceptionDistance with both sides as its state.

    torchmetrics draws subsets from the global torch RNG; it is forked and seeded so the call is
    reproducible without disturbing the caller's random stream.
    """
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    size = _validate_kid_args(subsets, subset_size, len(reference_features), len(fake))
    with warnings.catch_warnings():
        # It warns that it buffers all features; that is the point here and the sets are small.
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=extractor, subsets=subsets, subset_size=size, reset_real_features=False,
            sync_on_compute=False,  # the set is whole here: never all-gather (see fid_torchmetrics)
        )
    metric.real_features.append(torch.as_tensor(reference_features, dtype=torch.float64))
    metric.fake_features.append(fake)
    with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "compute before update": the state was filled directly
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {
        "kid_mean": float(mean),
        "kid_std": float(std),
        "kid_n": len(fake),
        "kid_ref_n": len(reference_features),
        "kid_subsets": subsets,
        "kid_subset_size": size,
        "features": extractor.name,
    }

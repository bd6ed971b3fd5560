"""Fréchet distance between Gaussian fits of feature sets (FID; Heusel et al. 2017, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium").

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})

Two routes compute it:

* :func:`fid_torchmetrics` - the main route: ``torchmetrics.image.fid.FrechetInceptionDistance`` with a
  custom feature module (any :class:`~ldm.metrics.features.FeatureExtractor`), its real-image state filled
  from cached reference statistics so the reference set is never re-encoded;
* :func:`frechet_distance` / :func:`fid_from_features` - float64 numpy/scipy with ``scipy.linalg.sqrtm`` and
  the eps-offset fallback of the original TTUR / pytorch-fid code; the cross-check the tests compare against.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ldm import distributed
from ldm.errors import ConfigError
from ldm.metrics.features import (
    FeatureExtractor,
    atomic_save_npz,
    cache_hit,
    cache_identity,
    reference_cache_path,
    reference_features,
    to_uint8_nhwc,
)


def _check_features(features: np.ndarray, what: str, min_count: int = 2) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {features.shape}")
    if len(features) < min_count:
        raise ValueError(f"{what} needs at least {min_count} samples, got {len(features)}")
    if not np.isfinite(features).all():
        raise ValueError(f"{what} contain NaN or inf")
    return features


@dataclass
class FeatureStats:
    """Gaussian fit (mean, unbiased covariance) of ``count`` features from ``feature_name``."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    count: int
    feature_name: str

    @classmethod
    def from_features(cls, features: np.ndarray, feature_name: str) -> FeatureStats:
        features = _check_features(features, "features")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features), feature_name)

    def save(self, path: str | os.PathLike, **identity: np.ndarray) -> None:
        atomic_save_npz(
            Path(path),
            mu=self.mu,
            sigma=self.sigma,
            count=np.array(self.count),
            stats_feature_name=np.array(self.feature_name),
            **identity,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, feature_name: str | None = None) -> FeatureStats:
        """Stats we saved, or any ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D), as ADM's reference batches ship
        them (no count, no extractor name: ``feature_name`` is then taken as theirs, count 0 = unknown)."""
        with np.load(path, allow_pickle=False) as stored:
            missing = [k for k in ("mu", "sigma") if k not in stored.files]
            if missing:
                raise ConfigError(f"{path} has no {' or '.join(missing)} (keys: {stored.files}): reference statistics "
                                  "are an .npz with mu (D,) and sigma (D, D), e.g. from ldm-evaluate write_reference_stats=")
            mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
            count = int(stored["count"]) if "count" in stored.files else 0
            name = str(stored["stats_feature_name"]) if "stats_feature_name" in stored.files else feature_name
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ConfigError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a (D,) mean and its (D, D) covariance")
        return cls(mu, sigma, count, str(name))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``sqrtm(sigma1 @ sigma2)`` is singular when there are fewer samples than dimensions; then both
    covariances are offset by ``eps * I`` (the TTUR reference fallback). A small imaginary part from
    round-off is dropped; a large one means the covariances are not PSD and is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched shapes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imag = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has imaginary component {largest_imag}; covariances not PSD"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(reference: FeatureStats, generated: FeatureStats) -> dict[str, float | int | str]:
    if reference.feature_name != generated.feature_name:
        raise ValueError(
            f"stats come from different extractors ({reference.feature_name!r} vs "
            f"{generated.feature_name!r}); "
            "recompute the reference statistics with the same extractor"
        )
    value = frechet_distance(reference.mu, reference.sigma, generated.mu, generated.sigma)
    return {
        "fid": value,
        "fid_n": generated.count,
        "fid_ref_n": reference.count,
        "features": generated.feature_name,
    }


def fid_from_features(
    real_features: np.ndarray, fake_features: np.ndarray, feature_name: str
) -> dict[str, float | int | str]:
    """FID between two feature matrices (N, D) with the numpy/scipy route."""
    return fid_from_stats(
        FeatureStats.from_features(_check_features(real_features, "real features"), feature_name),
        FeatureStats.from_features(_check_features(fake_features, "fake features"), feature_name),
    )


def reference_stats(
    dataset_key: str,
    resolution: int,
    extractor: FeatureExtractor,
    images_fn: Callable[[], np.ndarray | Tensor],
    cache_dir: str | os.PathLike,
    batch_size: int = 256,
    collective: bool = True,
) -> FeatureStats:
    """Reference Gaussian of a real dataset, cached per (dataset, resolution, extractor name).

    The features themselves are cached too (:func:`~ldm.metrics.features.reference_features`), since KID
    and precision/recall need them; ``images_fn`` runs only when neither cache holds this identity. In a
    distributed run (``collective``) every rank calls it and a miss is extracted in shares across the ranks.
    """
    path = reference_cache_path(cache_dir, dataset_key, resolution, extractor.name, "stats")
    identity = cache_identity(dataset_key, resolution, extractor.name)
    if cache_hit(path, identity, collective):
        return FeatureStats.load(path)
    features = reference_features(dataset_key, resolution, extractor, images_fn, cache_dir, batch_size, collective)
    stats = FeatureStats.from_features(features, extractor.name)
    if not collective or distributed.rank() == 0:
        stats.save(path, **identity)
    if collective:
        distributed.barrier()
    return stats


def fid_torchmetrics(
    extractor: FeatureExtractor,
    fake_images: np.ndarray | Tensor,
    reference: FeatureStats,
    batch_size: int = 256,
) -> dict[str, float | int | str]:
    """FID of ``fake_images`` against cached ``reference`` stats via torchmetrics' FrechetInceptionDistance.

    torchmetrics keeps running sums (sum f, sum f f^T, n) for the real set; they are reconstructed exactly
    from (mu, sigma, n) so cached statistics stand in for re-encoding the reference images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if reference.feature_name != extractor.name:
        raise ValueError(
            f"reference stats were computed with {reference.feature_name!r} but the extractor is "
            f"{extractor.name!r}; recompute them with reference_stats(...) for this extractor"
        )
    images = to_uint8_nhwc(fake_images)
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 generated images, got {len(images)}")
    # sync_on_compute=False: the set is whole on this process; a sync would all-gather across the ranks of
    # a distributed run, and hang when only rank 0 measures.
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)
    device = next(extractor.parameters()).device
    metric = metric.to(device)
    n = reference.count
    mu = torch.as_tensor(reference.mu, dtype=torch.float64, device=device)
    sigma = torch.as_tensor(reference.sigma, dtype=torch.float64, device=device)
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(device)
            metric.update(batch, real=False)
        value = metric.compute()
    return {"fid": float(value), "fid_n": len(images), "fid_ref_n": n, "features": extractor.name}

"""FID: Gaussian closed forms, an independent eigen-based reference, the torchmetrics route, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.metrics.classifier import DigitJudge
from ldm.metrics.features import JudgeFeatures, reference_cache_path
from ldm.metrics.fid import (
    FeatureStats,
    fid_from_features,
    fid_from_stats,
    fid_torchmetrics,
    frechet_distance,
    reference_stats,
)


def _eigen_frechet(mu1, sigma1, mu2, sigma2):
    """Independent reference: Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix."""
    root1 = scipy.linalg.sqrtm(sigma1).real
    eigenvalues = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


@pytest.fixture
def judge_features():
    torch.manual_seed(0)
    return JudgeFeatures(DigitJudge())


def test_closed_form_diagonal_gaussians():
    # ||mu1-mu2||^2 = 1 + 4 + 9; diagonal covariances give sum (sqrt(a) - sqrt(b))^2 = 1 + 1 + 1.
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 3.0])
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 16.0])
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(17.0, abs=1e-9)


def test_closed_form_scaled_full_covariance():
    # S2 = c S1 => (S1 S2)^1/2 = sqrt(c) S1 and FID = (1 - sqrt(c))^2 Tr(S1) for equal means.
    rng = np.random.default_rng(0)
    sigma = _random_spd(rng, 6)
    mu = rng.normal(size=6)
    expected = (1 - np.sqrt(2.5)) ** 2 * np.trace(sigma)
    assert frechet_distance(mu, sigma, mu, 2.5 * sigma) == pytest.approx(expected, rel=1e-9)


def test_sampled_gaussians_match_closed_form_and_self_is_zero():
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal(np.zeros(3), np.diag([1.0, 4.0, 9.0]), size=40_000)
    y = rng.multivariate_normal(np.array([1.0, 2.0, 3.0]), np.diag([4.0, 1.0, 16.0]), size=40_000)
    result = fid_from_features(x, y, "toy")
    assert result["fid"] == pytest.approx(17.0, rel=0.03)
    assert result["fid_n"] == 40_000 and result["fid_ref_n"] == 40_000 and result["features"] == "toy"
    assert abs(fid_from_features(x, x, "toy")["fid"]) < 1e-6


def test_matches_independent_eigen_computation():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 12)), rng.normal(size=(250, 12)) @ _random_spd(rng, 12) + 0.5
    ours = fid_from_features(x, y, "toy")["fid"]
    reference = _eigen_frechet(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(reference, rel=1e-8)


def test_fewer_samples_than_dims_uses_finite_fallback():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    value = fid_from_features(x, y, "toy")["fid"]
    reference = _eigen_frechet(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(value)
    assert value == pytest.approx(reference, rel=1e-3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)), "toy")
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    a = FeatureStats(np.zeros(2), np.eye(2), 5, "a")
    with pytest.raises(ValueError, match="different extractors"):
        fid_from_stats(a, FeatureStats(np.zeros(2), np.eye(2), 5, "b"))


def test_torchmetrics_route_matches_scipy_route(judge_features):
    rng = np.random.default_rng(4)
    real = rng.integers(0, 256, size=(300, 32, 32, 1), dtype=np.uint8)
    fake = rng.integers(0, 64, size=(260, 32, 32, 1), dtype=np.uint8)  # much darker: clearly different
    real_features, fake_features = judge_features.extract(real), judge_features.extract(fake)
    reference = FeatureStats.from_features(real_features, judge_features.name)

    via_torchmetrics = fid_torchmetrics(judge_features, fake, reference, batch_size=64)
    via_scipy = fid_from_features(real_features, fake_features, judge_features.name)
    real_again = rng.integers(0, 256, size=(300, 32, 32, 1), dtype=np.uint8)
    baseline = fid_from_features(real_features, judge_features.extract(real_again), "x")["fid"]
    assert via_scipy["fid"] > 10 * baseline > 0  # the routes are compared on a clearly non-zero value
    assert via_torchmetrics["fid"] == pytest.approx(via_scipy["fid"], rel=1e-4)
    assert via_torchmetrics["fid_n"] == 260 and via_torchmetrics["fid_ref_n"] == 300
    assert via_torchmetrics["features"] == judge_features.name

    # float NCHW [-1, 1] input is quantised exactly like the uint8 path.
    as_float = torch.from_numpy(fake).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert fid_torchmetrics(judge_features, as_float, reference)["fid"] == pytest.approx(
        via_torchmetrics["fid"], rel=1e-6
    )
    with pytest.raises(ValueError, match="recompute"):
        fid_torchmetrics(judge_features, fake, FeatureStats(reference.mu, reference.sigma, 300, "other"))


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    stats = FeatureStats.from_features(rng.normal(size=(50, 4)), "judge128-abc")
    stats.save(tmp_path / "s.npz")
    loaded = FeatureStats.load(tmp_path / "s.npz")  # np.load(allow_pickle=False) inside
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.feature_name) == (50, "judge128-abc")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file behind


def test_reference_stats_cache_hit_and_invalidation(tmp_path, judge_features):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(64, 32, 32), dtype=np.uint8)
    calls = []

    def images_fn():
        calls.append(1)
        return images

    first = reference_stats("toy-digits", 32, judge_features, images_fn, tmp_path)
    second = reference_stats("toy-digits", 32, judge_features, images_fn, tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert first.count == 64 and first.feature_name == judge_features.name
    expected = FeatureStats.from_features(judge_features.extract(images).astype(np.float32), "x")
    np.testing.assert_allclose(first.mu, expected.mu, rtol=1e-12)

    # Same network under another name (a different extractor as far as the cache knows) -> recomputed.
    judge_features.name = "judge-renamed"
    renamed = reference_stats("toy-digits", 32, judge_features, images_fn, tmp_path)
    assert len(calls) == 2 and renamed.feature_name == "judge-renamed"
    assert reference_cache_path(tmp_path, "toy-digits", 32, "judge-renamed", "stats").is_file()

    # Retrained / changed weights change the default name (a weight fingerprint), hence the cache key.
    before = JudgeFeatures(judge_features.judge).name
    with torch.no_grad():
        judge_features.judge.embed[-1].bias.add_(1.0)
    changed = JudgeFeatures(judge_features.judge)
    assert changed.name != before
    reference_stats("toy-digits", 32, changed, images_fn, tmp_path)
    assert len(calls) == 3

    with pytest.raises(ValueError, match="resolution"):
        reference_stats("toy-digits", 28, judge_features, images_fn, tmp_path)

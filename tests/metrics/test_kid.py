"""KID: a hand-computed case, unbiasedness on known distributions, torchmetrics cross-checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.metrics.classifier import DigitJudge
from ldm.metrics.features import JudgeFeatures
from ldm.metrics.kid import kid_from_features, kid_torchmetrics, mmd2_unbiased, polynomial_kernel


def test_hand_computed_tiny_example():
    # k(a, b) = (a b + 1)^3 with gamma = 1 (D = 1): k(0,1) = 1, k(1,2) = 27, k(1,1) = 8, k(0,2) = 1.
    # within-x: 2 * 1 / 2 = 1; within-y: 2 * 27 / 2 = 27; cross: 2 * (1 + 1 + 8 + 27) / 4 = 18.5.
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert mmd2_unbiased(x, y) == pytest.approx(9.5, abs=1e-12)
    result = kid_from_features(x, y, "toy", subsets=3, subset_size=2)
    assert result["kid_mean"] == pytest.approx(9.5, abs=1e-12)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-12)
    assert (result["kid_n"], result["kid_ref_n"], result["kid_subset_size"]) == (2, 2, 2)


def test_matches_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.3
    reference = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
    assert mmd2_unbiased(x, y) == pytest.approx(reference, rel=1e-10)
    np.testing.assert_allclose(polynomial_kernel(x, y), (x @ y.T / 8 + 1) ** 3)


def test_linear_kernel_estimates_squared_mean_distance():
    # With degree 1 and gamma 1, MMD^2 = ||E x - E y||^2 exactly; the unbiased estimator averages to it.
    rng = np.random.default_rng(1)
    shift = np.array([0.6, 0.8, 0.0, 0.0])  # ||shift||^2 = 1
    x, y = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4)) + shift
    result = kid_from_features(x, y, "toy", subsets=200, subset_size=200, degree=1, gamma=1.0)
    assert result["kid_mean"] == pytest.approx(1.0, abs=0.05)


def test_identical_distributions_average_to_zero():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(3000, 16)), rng.normal(size=(3000, 16))
    same = kid_from_features(x, y, "toy", subsets=100, subset_size=300, seed=3)
    shifted = kid_from_features(x, y + 0.5, "toy", subsets=100, subset_size=300, seed=3)
    # A biased (V-statistic) estimate would sit clearly above 0 here; the unbiased one straddles it.
    assert abs(same["kid_mean"]) < 3 * same["kid_std"] / np.sqrt(same["kid_subsets"]) + 1e-4
    assert shifted["kid_mean"] > 50 * abs(same["kid_mean"])
    assert same["kid_std"] > 0


def test_subset_size_shrinks_to_available_samples_and_seed_reproduces():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(20, 5))
    first = kid_from_features(x, y, "toy", subsets=10, subset_size=1000, seed=7)
    assert first["kid_subset_size"] == 20 and first["kid_n"] == 20 and first["kid_ref_n"] == 30
    assert kid_from_features(x, y, "toy", subsets=10, subset_size=1000, seed=7) == first
    with pytest.raises(ValueError, match="at least 2"):
        kid_from_features(x, y[:1], "toy")
    with pytest.raises(ValueError, match="equal D"):
        kid_from_features(x, y[:, :3], "toy")


def test_torchmetrics_route_matches_numpy_route():
    torch.manual_seed(0)
    extractor = JudgeFeatures(DigitJudge())
    rng = np.random.default_rng(5)
    real = rng.integers(0, 256, size=(60, 32, 32, 1), dtype=np.uint8)
    fake = rng.integers(0, 128, size=(60, 32, 32, 1), dtype=np.uint8)
    real_features = extractor.extract(real)
    # Subsets covering all samples are order-independent, so both routes see identical data.
    ours = kid_from_features(
        real_features, extractor.extract(fake), extractor.name, subsets=2, subset_size=60
    )
    theirs = kid_torchmetrics(extractor, fake, real_features, subsets=2, subset_size=60, batch_size=16)
    assert ours["kid_mean"] > 0
    assert theirs["kid_mean"] == pytest.approx(ours["kid_mean"], rel=1e-5)
    assert theirs["kid_n"] == 60 and theirs["features"] == extractor.name

    state = torch.get_rng_state()
    kid_torchmetrics(extractor, fake, real_features, subsets=3, subset_size=30, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched

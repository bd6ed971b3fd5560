"""Improved precision/recall on point clouds whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.metrics.precision_recall import manifold_radii, precision_recall


def test_radii_match_brute_force_with_batching():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(37, 5))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    for k in (1, 3):
        expected = np.sort(distances, axis=1)[:, k]  # column 0 is the point itself
        np.testing.assert_allclose(manifold_radii(points, k=k, batch_size=7).numpy(), expected, rtol=1e-12)


def test_identical_clouds_are_fully_precise_and_covered():
    points = np.random.default_rng(1).normal(size=(500, 8))
    result = precision_recall(points, points.copy(), "toy", batch_size=128)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert (result["pr_n"], result["pr_ref_n"], result["pr_k"], result["features"]) == (500, 500, 3, "toy")


def test_disjoint_clouds_score_zero():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(400, 2)), rng.normal(size=(300, 2)) + 100.0
    result = precision_recall(real, fake, "toy")
    assert result["precision"] == 0.0 and result["recall"] == 0.0


def test_generator_covering_half_of_the_data():
    # Real data fills [0, 2] x [0, 1]; the generator only produces the left half [0, 1] x [0, 1], at the
    # same density. Every generated point is realistic (precision ~1); half the real data is missed
    # (recall ~0.5).
    rng = np.random.default_rng(3)
    real = rng.random(size=(4000, 2)) * np.array([2.0, 1.0])
    fake = rng.random(size=(2000, 2))
    result = precision_recall(real, fake, "toy", batch_size=512)
    assert result["precision"] > 0.95  # k-NN balls leave small gaps even inside the support
    assert result["recall"] == pytest.approx(0.5, abs=0.04)

    swapped = precision_recall(fake, real, "toy")  # roles swapped: the generator overshoots the data
    assert swapped["recall"] > 0.95 and swapped["precision"] == pytest.approx(0.5, abs=0.04)


def test_bad_inputs_raise():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(rng.normal(size=(3, 2)), rng.normal(size=(10, 2)), "toy", k=3)
    with pytest.raises(ValueError, match="feature dims differ"):
        precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)), "toy")
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.full((10, 2), np.nan), rng.normal(size=(10, 2)), "toy")

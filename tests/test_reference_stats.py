"""``ldm-evaluate reference_stats=`` (FID against a reference's mu/sigma, as ADM's reference batches ship them) and
``write_reference_stats=`` (writing them once): the FID equals the one from the reference images themselves, the
file round-trips, ADM's two-key format reads, and a file of the wrong width is one error line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.config import ConfigError
from ldm.data.mnist5k import load_mnist5k_arrays, stratified_split
from ldm.data.tensor_images import fit_uint8_images
from ldm.evaluate import evaluate
from ldm.metrics import FeatureStats, JudgeFeatures, load_or_train_judge

REPO = Path(__file__).resolve().parents[1]


def compose_evaluate(overrides: list[str], out: Path, cache: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[*overrides, f"paths.output_dir={out}", f"paths.cache_dir={cache}",
                                              f"out_dir={out}"])


@pytest.fixture(scope="module")
def cache(request, tmp_path_factory) -> Path:
    store = getattr(request.config, "cache", None)  # reference features, kept as tests/test_evaluate.py keeps them
    return Path(store.mkdir("ldm-eval-cache")) if store is not None else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """(a folder of 120 real val digits as PNGs: the reference, a samples.npz of 80 others, the reference pixels)."""
    images, labels = load_mnist5k_arrays()
    _, val_idx = stratified_split(labels, 0.1, 0)
    pixels = fit_uint8_images(torch.from_numpy(images[val_idx]).unsqueeze(1), 32, "pad").permute(0, 2, 3, 1).numpy()
    root = tmp_path_factory.mktemp("digits")
    for i, image in enumerate(pixels[:120]):
        (root / "ref").mkdir(exist_ok=True)
        Image.fromarray(image[..., 0]).save(root / "ref" / f"{i:03d}.png")
    np.savez(root / "samples.npz", arr_0=pixels[200:280], labels=labels[val_idx][200:280])
    return root / "ref", root / "samples.npz", pixels[:120]


def test_fid_from_reference_stats_equals_fid_from_the_reference_images(digits, cache, tmp_path):
    reference, samples, pixels = digits
    direct = evaluate(compose_evaluate([f"samples={samples}", f"reference={reference}", "metrics=[fid]"],
                                       tmp_path / "direct", cache))
    stats_file = tmp_path / "ref_stats.npz"
    evaluate(compose_evaluate([f"reference={reference}", "image_size=32", f"write_reference_stats={stats_file}"],
                              tmp_path / "write", cache))
    via = evaluate(compose_evaluate([f"samples={samples}", f"reference_stats={stats_file}", "metrics=[fid,kid]"],
                                    tmp_path / "via", cache))
    fid, from_stats = direct["metrics"]["fid"]["value"], via["metrics"]["fid"]["value"]
    assert fid > 0 and abs(from_stats - fid) <= 1e-6 * fid
    assert via["metrics"]["fid"]["ref_n"] == 120 and via["metrics"]["fid"]["n"] == 80
    assert "kid" in via["skipped"] and "mu/sigma" in via["skipped"]["kid"]

    # Round trip: the file holds the Gaussian of the reference's features under the same extractor.
    extractor = JudgeFeatures(load_or_train_judge(cache))
    expected = FeatureStats.from_features(extractor.extract(pixels), extractor.name)
    stored = FeatureStats.load(stats_file)
    assert stored.count == 120 and stored.feature_name == extractor.name == direct["metrics"]["fid"]["features"]
    # Extracted in other batch sizes (120 here, one folder read there): float32 features, fp32 tolerance.
    np.testing.assert_allclose(stored.mu, expected.mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stored.sigma, expected.sigma, rtol=1e-5, atol=1e-5)

    # ADM's reference batches carry mu and sigma alone: read as this extractor's, the same FID.
    adm = tmp_path / "adm_ref.npz"
    np.savez(adm, mu=stored.mu, sigma=stored.sigma)
    as_adm = evaluate(compose_evaluate([f"samples={samples}", f"reference_stats={adm}", "metrics=[fid]"],
                                       tmp_path / "adm", cache))
    assert as_adm["metrics"]["fid"]["value"] == from_stats


def test_stats_of_the_wrong_width_are_one_error_line_before_any_work(digits, cache, tmp_path):
    _, samples, _ = digits
    bad = tmp_path / "inception_like.npz"
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "ldm.evaluate", f"samples={samples}", f"reference_stats={bad}",
                           f"paths.cache_dir={cache}", f"out_dir={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ldm-evaluate: error:")]
    assert len(errors) == 1 and "64-d statistics but features=judge gives 128-d" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "metrics.json").exists()
    with pytest.raises(ConfigError, match="has no sigma"):
        np.savez(bad, mu=np.zeros(128))
        evaluate(compose_evaluate([f"samples={samples}", f"reference_stats={bad}"], tmp_path, cache))
    with pytest.raises(ConfigError, match="not both"):
        evaluate(compose_evaluate([f"samples={samples}", f"reference_stats={bad}", f"write_reference_stats={bad}"],
                                  tmp_path, cache))

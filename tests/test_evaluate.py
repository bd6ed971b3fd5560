"""``ldm-evaluate`` through its Hydra composition: real digits score well, noise scores badly, the report
carries counts and feature names, and bad inputs fail early with a message that names the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.config import ConfigError
from ldm.data.mnist5k import load_mnist5k_arrays, stratified_split
from ldm.data.tensor_images import fit_uint8_images
from ldm.evaluate import evaluate, flat_metrics, load_samples, summary_line

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_evaluate(overrides: list[str], out: Path, cache: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[*overrides, f"paths.output_dir={out}", f"paths.cache_dir={cache}"])


@pytest.fixture(scope="module")
def cache(request, tmp_path_factory) -> Path:
    # Reference features are keyed by their exact data and the judge's weights (shipped), so a cache that
    # outlives the run is never stale; it saves extracting them again on every run.
    store = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    return Path(store.mkdir("ldm-eval-cache")) if store is not None else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def val_digits() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST-5k val split as a sampler would write it: uint8 (500, 32, 32, 1) and labels."""
    images, labels = load_mnist5k_arrays()
    _, val_idx = stratified_split(labels, 0.1, 0)
    padded = fit_uint8_images(torch.from_numpy(images[val_idx]).unsqueeze(1), 32, "pad")
    return padded.permute(0, 2, 3, 1).numpy(), labels[val_idx]


@pytest.fixture(scope="module")
def val_report(tmp_path_factory, cache, val_digits):
    folder = tmp_path_factory.mktemp("val")
    np.savez(folder / "samples.npz", arr_0=val_digits[0], labels=val_digits[1])
    overrides = [f"samples={folder / 'samples.npz'}", "write_next_to_samples=true", "kid.subsets=20"]
    cfg = compose_evaluate(overrides, folder / "out", cache)
    return evaluate(cfg), folder


@pytest.fixture(scope="module")
def noise_report(tmp_path_factory, cache):
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    np.savez(folder / "samples.npz", arr_0=rng.integers(0, 256, (500, 32, 32, 1), dtype=np.uint8),
             labels=rng.integers(0, 10, 500))
    overrides = [f"samples={folder / 'samples.npz'}", "metrics=[fid,kid,accuracy]", "kid.subsets=20"]  # P/R: covered by the val set
    return evaluate(compose_evaluate(overrides, folder / "out", cache))


def test_real_val_digits_score_low_fid_and_high_accuracy(val_report, noise_report):
    metrics = val_report[0]["metrics"]
    noise = noise_report["metrics"]
    assert metrics["accuracy"]["value"] >= 0.95  # the judge really judges...
    assert 0.0 <= noise["accuracy"]["value"] <= 0.3  # ...and is at chance on noise
    assert metrics["fid"]["value"] < 0.02 * noise["fid"]["value"]
    assert abs(metrics["kid"]["value"]) < 0.02 * noise["kid"]["value"]  # unbiased: may dip below 0
    assert metrics["pr"]["precision"] > 0.6 and metrics["pr"]["recall"] > 0.6


def test_report_names_counts_and_features_and_is_written(val_report):
    report, folder = val_report
    metrics = report["metrics"]
    features = metrics["fid"]["features"]
    assert features.startswith("judge128-")
    for name in ("fid", "kid", "pr"):
        assert metrics[name]["n"] == 500 and metrics[name]["ref_n"] == 4500
        assert metrics[name]["features"] == features
    assert metrics["accuracy"]["n"] == 500 and metrics["accuracy"]["features"].startswith("digit-judge-")
    assert metrics["kid"]["subset_size"] == 500 and metrics["pr"]["k"] == 3
    assert report["skipped"] == {}
    assert report["samples"]["n"] == 500 and report["reference"]["key"].startswith("mnist5k-train-")
    on_disk = json.loads((folder / "out" / "metrics.json").read_text())
    assert on_disk == json.loads((folder / "samples.metrics.json").read_text())
    assert on_disk["metrics"] == json.loads(json.dumps(metrics))
    assert on_disk["summary"].startswith("FID(judge128, n=500 vs 4500) ")
    assert f"acc {100 * metrics['accuracy']['value']:.1f}% (n=500)" in on_disk["summary"]
    flat = flat_metrics(metrics)
    assert flat["eval/fid"] == metrics["fid"]["value"] and flat["eval/fid_n"] == 500
    assert flat["eval/pr_recall"] == metrics["pr"]["recall"]


def test_reference_statistics_are_cached_per_dataset_resolution_and_features(val_report, cache):
    features = val_report[0]["metrics"]["fid"]["features"]
    stats = list(cache.glob(f"mnist5k-train-*-32px-{features}-stats.npz"))
    assert len(stats) == 1
    with np.load(stats[0]) as stored:
        assert int(stored["count"]) == 4500 and stored["sigma"].shape == (128, 128)


def test_folder_of_images_without_labels_skips_accuracy_with_the_reason(tmp_path, cache, val_digits, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(val_digits[0][:40]):
        Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    report = evaluate(compose_evaluate([f"samples={folder}", "metrics=[fid,accuracy,is,clip_score]"],
                                       tmp_path / "out", cache))
    assert report["metrics"]["fid"]["n"] == 40
    assert set(report["skipped"]) == {"accuracy", "is", "clip_score"}
    assert "no labels" in report["skipped"]["accuracy"] and "no prompts" in report["skipped"]["clip_score"]
    assert "accuracy skipped (" in report["summary"]
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    # the one-line summary, where metrics.json went, and the next command
    assert lines[-3:-1] == [report["summary"], f"metrics: {tmp_path / 'out' / 'metrics.json'}"]
    assert lines[-1].startswith("next: ldm-evaluate samples=")
    assert "warning: FID/KID from n=40 samples (< kid.subset_size=" in printed.err  # 40 is too few to compare
    np.testing.assert_array_equal(load_samples(folder).images, val_digits[0][:40])


def test_inception_score_is_skipped_without_weights_not_crashing(tmp_path, cache, val_digits, monkeypatch):
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    np.savez(tmp_path / "s.npz", arr_0=val_digits[0][:20], labels=val_digits[1][:20],
             prompts=np.array(["a digit"] * 20))
    report = evaluate(compose_evaluate([f"samples={tmp_path / 's.npz'}", "metrics=[accuracy,is,clip_score]"],
                                       tmp_path / "out", cache))
    assert report["metrics"]["accuracy"]["n"] == 20
    # Without weights, or without torch-fidelity itself: either way a reason, not a crash.
    assert any(word in report["skipped"]["is"] for word in ("Inception", "torch-fidelity"))
    assert "clip_model=" in report["skipped"]["clip_score"]
    with pytest.raises(ConfigError, match="features=inception .*(not available offline|torch-fidelity)"):
        evaluate(compose_evaluate([f"samples={tmp_path / 's.npz'}", "features=inception", "metrics=[fid]"],
                                  tmp_path / "out", cache))


def test_an_active_wandb_run_gets_the_metrics_in_its_summary(tmp_path, cache, val_digits, monkeypatch):
    run = SimpleNamespace(summary={})
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=run))  # as inside a training job
    np.savez(tmp_path / "s.npz", arr_0=val_digits[0][:30], labels=val_digits[1][:30])
    report = evaluate(compose_evaluate([f"samples={tmp_path / 's.npz'}", "metrics=[accuracy]"], tmp_path, cache))
    assert run.summary == {"eval/accuracy": report["metrics"]["accuracy"]["value"], "eval/accuracy_n": 30,
                           "eval/accuracy_judge_val_acc": report["metrics"]["accuracy"]["judge_val_acc"]}


@pytest.mark.parametrize(
    "arrays, match",
    [
        (None, "does not exist"),
        ({"images": np.zeros((4, 32, 32, 1), np.uint8)}, "no arr_0"),
        ({"arr_0": np.zeros((4, 1, 32, 32), np.float32)}, "dtype float32.*uint8"),
        ({"arr_0": np.zeros((4, 32, 32, 2), np.uint8)}, "C in"),
        ({"arr_0": np.zeros((4, 32, 32, 1), np.uint8), "labels": np.zeros(3, np.int64)}, "labels must be 4"),
    ],
)
def test_bad_sample_files_fail_with_a_clear_error(tmp_path, arrays, match):
    path = tmp_path / "samples.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=match):
        load_samples(path)


def test_config_mistakes_fail_before_any_work(tmp_path, cache, val_digits):
    with pytest.raises(ConfigError, match="exactly one of samples=, model_path=, autoencoder="):
        evaluate(compose_evaluate([], tmp_path, cache))
    np.savez(tmp_path / "s.npz", arr_0=val_digits[0][:8])
    with pytest.raises(ConfigError, match="unknown metrics \\['fd'\\]"):
        evaluate(compose_evaluate([f"samples={tmp_path / 's.npz'}", "metrics=[fd]"], tmp_path, cache))
    with pytest.raises(ConfigError, match="features must be .judge. or .inception."):
        evaluate(compose_evaluate([f"samples={tmp_path / 's.npz'}", "features=clip"], tmp_path, cache))
    with pytest.raises(ConfigError, match="neither 'mnist5k' nor a folder"):
        evaluate(compose_evaluate([f"samples={tmp_path / 's.npz'}", "reference=cifar"], tmp_path, cache))
    rgb = np.repeat(val_digits[0][:8], 3, axis=-1)
    np.savez(tmp_path / "rgb.npz", arr_0=rgb)
    with pytest.raises(ConfigError, match="features=judge: .*1-channel"):
        evaluate(compose_evaluate([f"samples={tmp_path / 'rgb.npz'}", "metrics=[fid]"], tmp_path, cache))


class _Posterior:
    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def mode(self) -> torch.Tensor:
        return self.z


class _PixelAutoencoder(torch.nn.Module):
    """Identity (or negation) in pixel space: the reconstruction metrics then have closed forms."""

    def __init__(self, negate: bool) -> None:
        super().__init__()
        self.sign = -1.0 if negate else 1.0
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so .to(device) has something to move

    def encode(self, x: torch.Tensor) -> _Posterior:
        return _Posterior(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.sign * z


@pytest.mark.parametrize("negate", [False, True])
def test_autoencoder_mode_matches_closed_forms(tmp_path, cache, val_digits, monkeypatch, negate):
    import ldm.io.export

    monkeypatch.setattr(ldm.io.export, "load_autoencoder", lambda path: (_PixelAutoencoder(negate), {}))
    report = evaluate(compose_evaluate(["autoencoder=fake", "reconstruction_metrics=[psnr,ssim,lpips,fid]"],
                                       tmp_path, cache))
    metrics = report["metrics"]
    assert "lpips_weights_path" in report["skipped"]["lpips"]
    assert metrics["rfid"]["n"] == metrics["rfid"]["ref_n"] == 500 and metrics["psnr"]["n"] == 500
    if not negate:
        assert metrics["psnr"]["value"] == float("inf") and metrics["ssim"]["value"] == pytest.approx(1.0)
        assert abs(metrics["rfid"]["value"]) < 1e-3
        return
    x = val_digits[0].astype(np.float64) / 255.0
    mse = ((x - (1.0 - x)) ** 2).reshape(len(x), -1).mean(axis=1)
    assert metrics["psnr"]["value"] == pytest.approx(np.mean(10 * np.log10(1.0 / mse)), rel=1e-4)
    assert metrics["ssim"]["value"] < 0 and metrics["rfid"]["value"] > 100
    assert summary_line(metrics, {}).startswith("PSNR(n=500) ")

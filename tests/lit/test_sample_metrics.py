"""SampleMetricsCallback on a tiny stage-2 run: it samples, measures and logs each metric with its count."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from ldm.io.export import save_export
from ldm.lit.sample_metrics import SampleMetricsCallback


@pytest.fixture(scope="module")
def cache(request, tmp_path_factory) -> Path:
    # Shared with tests/test_evaluate.py: the judge and reference statistics are content-keyed.
    store = getattr(request.config, "cache", None)
    return Path(store.mkdir("ldm-eval-cache")) if store is not None else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory, compose_cfg):
    """A stage-2 module and MNIST-5k data on an untrained stage-1 export (the callback needs no quality)."""
    root = tmp_path_factory.mktemp("tiny")
    vae_cfg = compose_cfg(["stage=vae"], root)
    torch.manual_seed(0)
    autoencoder = instantiate(vae_cfg.model.vae.autoencoder)
    meta = {"kind": "autoencoder", "latent_channels": 3, "downsample_factor": 4, "latent_std": 1.0}
    config = {"autoencoder": OmegaConf.to_container(vae_cfg.model.vae.autoencoder, resolve=True)}
    save_export(root / "vae", autoencoder.state_dict(), config, meta)
    cfg = compose_cfg(["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={root / 'vae'}",
                       "data.batch_size=8", "stage.module.preview.every_n_steps=0"], root)
    return instantiate(cfg.stage.module), instantiate(cfg.data), root


def test_callback_logs_metrics_with_counts_and_is_reproducible(tiny_ldm, cache):
    module, datamodule, root = tiny_ldm
    callback = SampleMetricsCallback(
        every_n_steps=2, per_class=2, guidance_scale=2.0, sampler={"name": "ddim", "steps": 2},
        metrics=["accuracy", "fid", "kid", "is"], seed=7, cache_dir=str(cache), batch_size=64,
    )
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=0, accelerator="cpu", logger=CSVLogger(root, name="csv"),
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)

    # Every 2 steps, and once at the end of training (step 3).
    assert [h["step"] for h in callback.history] == [2.0, 3.0]
    last = callback.history[-1]
    assert last["val/accuracy_n"] == last["val/fid_n"] == last["val/kid_n"] == 20  # 10 classes x 2
    assert last["val/fid_ref_n"] == 4500 and last["val/fid"] > 0
    assert 0.0 <= last["val/accuracy"] <= 1.0
    assert "val/is" not in last and not any(k.endswith("_subsets") for k in last)  # skipped / not logged
    assert float(trainer.callback_metrics["val/fid"]) == pytest.approx(last["val/fid"])

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/fid")]
    assert [int(row["step"]) for row in rows] == [2, 3]
    assert float(rows[-1]["val/fid_n"]) == 20 and float(rows[-1]["val/fid"]) == pytest.approx(last["val/fid"])

    # A fixed seed: measuring the same weights again gives the same numbers.
    again = callback.compute(trainer, module)
    np.testing.assert_allclose([again[k] for k in sorted(again)], [last[k] for k in sorted(again)], rtol=1e-6)


def test_constructor_rejects_unknown_metrics_and_bad_counts():
    with pytest.raises(ValueError, match="unknown metrics \\['fdi'\\]"):
        SampleMetricsCallback(metrics=["fdi"])
    with pytest.raises(ValueError, match="per_class >= 1"):
        SampleMetricsCallback(per_class=0)


@pytest.mark.parametrize("data, reference, features", [
    ("mnist5k", "mnist5k", "judge"),
    ("folder", "<root>", "inception"),
    ("stream", None, None),
])
def test_callbacks_sample_metrics_compare_with_the_runs_own_data(compose_cfg, tmp_path, data, reference, features):
    """callbacks=sample_metrics follows data=: MNIST-5k with the digit judge, a folder's own images with Inception
    features, and data it cannot read real images of is refused before training with the key to set."""
    from types import SimpleNamespace

    from ldm.errors import ConfigError

    overrides = ["stage=ldm", "callbacks=sample_metrics", f"data={data}"]
    if data == "folder":
        overrides.append(f"data.root={tmp_path}")
    if data == "stream":
        overrides.append(f"data.path={tmp_path}")
    cfg = compose_cfg(overrides, tmp_path)
    callback, datamodule = instantiate(cfg.callbacks.sample_metrics), instantiate(cfg.data)
    trainer = SimpleNamespace(datamodule=datamodule)
    if reference is None:
        with pytest.raises(ConfigError, match="callbacks.sample_metrics.reference=<a folder of real images>"):
            callback.setup(trainer, None, "fit")
        return
    callback.setup(trainer, None, "fit")
    assert callback.eval_cfg.reference == reference.replace("<root>", str(tmp_path))
    assert callback.eval_cfg.features == features

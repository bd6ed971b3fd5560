"""Options of ldm-train that must work, or be refused at start-up with the fix named, met through the entry point
as a user meets them: DiT's learned-variance head, previews of a text model, the latent cache beside data options
it cannot honour, and the in-training sample metrics' reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.nets.backbone import run_backbone
from ldm.train import train

FAST = ["stage=ldm", "debug=fast", "logger=csv", "data.batch_size=4", "stage.final_samples.enabled=false"]


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory, compose_cfg):
    """An untrained kl-f4 autoencoder export: stage 2's plumbing needs its shapes, not its quality."""
    from ldm.io.export import save_export

    autoencoder_cfg = compose_cfg(["model/vae=kl_f4"]).model.vae.autoencoder
    autoencoder = instantiate(autoencoder_cfg)
    return save_export(tmp_path_factory.mktemp("vae") / "export", autoencoder.state_dict(),
                       {"autoencoder": OmegaConf.to_container(autoencoder_cfg, resolve=True)},
                       {"kind": "autoencoder", "latent_channels": 3, "downsample_factor": 4, "latent_std": 1.0})


def test_dit_with_learn_sigma_trains_exports_and_samples_from_its_prediction_half(vae_export, compose_cfg, tmp_path):
    """Official DiT checkpoints have learn_sigma=True: the head outputs 2 x 3 channels, the model uses the first 3."""
    from ldm.io.load import load_ldm

    cfg = compose_cfg([*FAST, "model/ldm=dit_tiny", "model.ldm.backbone.learn_sigma=true", "cond=class_vector",
                       f"first_stage.path={vae_export}", "stage.module.preview.every_n_steps=0"], tmp_path / "run")
    results = train(cfg)
    assert np.isfinite(results["train/loss"])
    model, _ = load_ldm(tmp_path / "run" / "export")
    assert model.backbone.learn_sigma and model.backbone.out_channels == 6
    model.eval()
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        cond = model.conditioner({"label": torch.tensor([1, 2])})
        raw = model.backbone(z, t, y=cond["y"])
        assert raw.shape == (2, 6, 8, 8)
        assert torch.equal(run_backbone(model.backbone, z, t, cond), raw[:, :3])
    images = model.sample({"label": torch.tensor([1, 2])}, 32, {"name": "ddim", "steps": 2},
                          generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()

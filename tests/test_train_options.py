"""Options of ldm-train that must work, or be refused at start-up with the fix named, met through the entry point
as a user meets them: DiT's learned-variance head, previews of a text model, the latent cache beside data options
it cannot honour, and the in-training sample metrics' reference."""

from __future__ import annotations

import logging

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


def test_text_model_previews_draw_seeded_data_captions_and_say_which(vae_export, compose_cfg, tmp_path, caplog):
    """cond=text without preview.prompts: the grids show 4 captions of the validation data (8 rows of 2 samples
    would be 4 prompts x 2), guided, and the log names them; the same seed picks the same captions."""
    from PIL import Image

    from ldm.io.images import to_uint8_grid

    overrides = [*FAST, "model/ldm=unet_tiny", "cond=text", f"first_stage.path={vae_export}", "sampler.steps=2",
                 "stage.max_steps=2", "stage.module.preview.every_n_steps=2", "stage.module.preview.per_class=2"]
    with caplog.at_level(logging.INFO):
        train(compose_cfg(overrides, tmp_path / "run"))
    chosen = [r for r in caplog.records if r.getMessage().startswith("previews draw 4 captions of the data")]
    assert len(chosen) == 1 and "guidance_scale=3.5 skipped" not in caplog.text
    grid = np.asarray(Image.open(tmp_path / "run" / "images" / "samples_cfg3.5_step0000002.png"))
    assert grid.shape[:2] == to_uint8_grid(torch.zeros(8, 1, 32, 32), nrow=2).shape[:2]  # 4 prompts x 2

    dm = instantiate(compose_cfg(overrides, tmp_path / "again").data)
    dm.setup("fit")
    captions = dm.example_captions(4, 1234)
    assert len(set(captions)) == 4 and str(captions) in chosen[0].getMessage()
    assert dm.example_captions(4, 1234) == captions != dm.example_captions(4, 1235)


def _folder(root, sizes):
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8), "L").save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("option, message", [
    ("data.buckets={step: 8, max_aspect: 2.0}", r"stage.latent_cache=true cannot cache data.buckets.*stage.latent_cache=false"),
    ("data.random_crop=true", r"data.random_crop=true.*epoch 0's crop.*data.random_crop=false"),
])
def test_latent_cache_refuses_data_options_it_cannot_honour_at_start_up(vae_export, compose_cfg, tmp_path, option,
                                                                        message):
    root = _folder(tmp_path / "imgs", [(30, 60)] * 4 + [(60, 30)] * 4 + [(40, 40)] * 4)
    cfg = compose_cfg([*FAST, "model/ldm=unet_tiny", "cond=none", f"first_stage.path={vae_export}", "data=folder",
                       f"data.root={root}", "data.mode=L", "data.image_size=32", "data.num_workers=0",
                       "data.batch_size=2", "stage.latent_cache=true", option], tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()

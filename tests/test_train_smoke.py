"""End to end through ldm-train's composition: stage 1, its export, and stage 2 on that export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.config import ConfigError
from ldm.io.export import load_autoencoder, read_export
from ldm.train import train

FAST = ["debug=fast", "logger=csv", "data.batch_size=16"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, compose_cfg):
    out = tmp_path_factory.mktemp("vae")
    cfg = compose_cfg(["stage=vae", *FAST], out)
    results = train(cfg)
    return out, results


def test_stage1_trains_and_exports_a_loadable_autoencoder(stage1):
    out, results = stage1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "config.yaml").is_file()
    autoencoder, meta = load_autoencoder(out / "export")
    assert meta["latent_channels"] == autoencoder.embed_dim and meta["latent_std"] > 0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    own = {k.removeprefix("autoencoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder.")}
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    fresh = type(autoencoder)(**{"ddconfig": autoencoder.config.__dict__, "embed_dim": autoencoder.embed_dim})
    fresh.load_state_dict(own)
    fresh.eval()
    # export -> load gives the same outputs as the trained weights
    torch.testing.assert_close(autoencoder.decode(autoencoder.encode(x).mode()), fresh.decode(fresh.encode(x).mode()))


@pytest.mark.parametrize("cond", ["class", "none", "text", "inpaint", "class_text", "class_hybrid"])
def test_stage2_trains_on_the_export_for_each_conditioner(stage1, compose_cfg, tmp_path, cond):
    vae_out, _ = stage1
    cfg = compose_cfg(
        ["stage=ldm", f"cond={cond}", "model/ldm=unet_tiny", f"first_stage.path={vae_out / 'export'}",
         "stage.final_samples.per_class=2", "stage.final_samples.judge=null", *FAST],
        tmp_path,
    )
    results = train(cfg)
    tensors, config, meta = read_export(tmp_path / "export", kind="ldm")
    assert any(k.startswith("model.diffusion_model.input_blocks.0.0") for k in tensors)
    assert float(tensors["scale_factor"]) == pytest.approx(1.0 / json.loads((vae_out / "export" / "meta.json").read_text())["latent_std"])
    if cond in ("none", "inpaint"):
        return
    samples = np.load(results["samples"])
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (20, 32, 32, 1)
    assert samples["labels"].tolist() == [c for c in range(10) for _ in range(2)]


@pytest.mark.parametrize("model", ["dit_tiny", "dit_s2", "dit_b2"])
@pytest.mark.parametrize("cond", ["class", "class_vector"])
def test_a_dit_backbone_trains_exports_and_samples_in_the_unet_slot(stage1, compose_cfg, tmp_path, model, cond):
    """model/ldm=dit_*: the transformer takes the denoiser's place with either class route (a cross-attention
    token, or labels through adaLN as in DiT); its export loads for ldm-sample and draws the same images as
    the trained module. dit_s2/dit_b2 are composed and built at full size but only checked here, not trained."""
    from hydra.utils import instantiate

    from ldm.io.load import load_ldm
    from ldm.nets.dit import DiT

    vae_out, _ = stage1
    cfg = compose_cfg(["stage=ldm", f"cond={cond}", f"model/ldm={model}", f"first_stage.path={vae_out / 'export'}",
                       "stage.final_samples.per_class=1", "stage.final_samples.judge=null", "sampler=ddim",
                       "sampler.steps=3", *FAST], tmp_path)
    if model != "dit_tiny":
        net = instantiate(cfg.stage.module.model).backbone
        assert isinstance(net, DiT) and net.out_channels == 3
        assert (net.context_dim is None) == (cond == "class_vector")
        return
    results = train(cfg)
    tensors, config, _ = read_export(tmp_path / "export", kind="ldm")
    assert "model.diffusion_model.blocks.0.adaLN_modulation.1.weight" in tensors
    sampler, _ = load_ldm(tmp_path / "export")
    assert isinstance(sampler.backbone, DiT)
    images = sampler.sample({"label": torch.arange(3)}, 32, {"name": "ddim", "steps": 3}, 2.0,
                            torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 32, 32) and torch.isfinite(images).all()
    assert np.load(results["samples"])["arr_0"].shape == (10, 32, 32, 1)


@pytest.mark.slow
def test_stage2_with_latent_cache_hits_the_second_time(stage1, compose_cfg, tmp_path):
    vae_out, _ = stage1
    overrides = ["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={vae_out / 'export'}",
                 "stage.latent_cache=true", "stage.final_samples.enabled=false", *FAST]
    train(compose_cfg(overrides, tmp_path / "a"))
    train(compose_cfg([*overrides, f"paths.cache_dir={tmp_path / 'a' / 'cache'}"], tmp_path / "b"))
    cached = list((tmp_path / "a" / "cache" / "latents").glob("latents-*.safetensors"))
    assert len(cached) == 2  # train + val, built once, reused by the second run


def test_a_backbone_config_that_sets_wired_channels_fails_at_start(stage1, compose_cfg, tmp_path):
    vae_out, _ = stage1
    cfg = compose_cfg(["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={vae_out / 'export'}",
                    "+model.ldm.backbone.in_channels=7", *FAST], tmp_path)
    with pytest.raises(ConfigError, match=r"model.ldm.backbone sets in_channels=7, which the model wires"):
        train(cfg)


def test_an_inpainting_model_samples_from_image_and_mask(stage1, compose_cfg, tmp_path):
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from ldm.sample import run

    vae_out, _ = stage1
    train(compose_cfg(["stage=ldm", "cond=inpaint", "model/ldm=unet_tiny", f"first_stage.path={vae_out / 'export'}",
                       *FAST], tmp_path / "train"))
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255  # keep the top half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    conf = Path(__file__).resolve().parents[1] / "conf"
    base = [f"model_path={tmp_path / 'train' / 'export'}", "n=3", "sampler=ddim", "sampler.steps=2", "save_pngs=false"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("sample", overrides=[*base, f"init_images={tmp_path / 'init.png'}", f"mask={tmp_path / 'mask.png'}",
                                           f"out_dir={tmp_path / 's'}", f"paths.output_dir={tmp_path / 's'}"])
        missing = compose("sample", overrides=[*base, f"out_dir={tmp_path / 'm'}", f"paths.output_dir={tmp_path / 'm'}"])
    run(cfg)
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (3, 32, 32, 1)
    with pytest.raises(ConfigError, match="inpainting model.*init_images"):
        run(missing)


def test_the_stage2_export_holds_the_ema_weights_not_the_live_unet(stage1, compose_cfg, tmp_path):
    """Samplers downstream (ldm-sample, diffusers) read model.diffusion_model.* as the model: it must be the
    EMA. decay 0.9 from the first step keeps the average visibly behind the live weights after 4 steps."""
    from safetensors.torch import load_file

    vae_out, _ = stage1
    train(compose_cfg(["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={vae_out / 'export'}", *FAST,
                       "stage.final_samples.enabled=false", "stage.module.ema.decay=0.9",
                       "stage.module.ema.warmup_steps=1"], tmp_path))
    exported = {k.removeprefix("model.diffusion_model."): v
                for k, v in load_file(str(tmp_path / "export" / "model.safetensors")).items()
                if k.startswith("model.diffusion_model.")}
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(state["ema.num_updates"]) == 4
    ema = {k.removeprefix("ema.model."): v for k, v in state.items() if k.startswith("ema.model.")}
    live = {k.removeprefix("model.backbone."): v for k, v in state.items() if k.startswith("model.backbone.")}
    assert exported.keys() == ema.keys() == live.keys()
    for key in exported:
        assert torch.equal(exported[key], ema[key]), f"export's {key} is not the EMA's"
    moved = [k for k in live if live[k].is_floating_point() and not torch.equal(live[k], ema[k])]
    assert len(moved) > len(live) // 2  # so equality with the EMA above says something

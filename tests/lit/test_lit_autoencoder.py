"""AutoencoderModule with a Lightning Trainer (CPU, tiny nets, random data) and the image-grid helpers."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.lit.autoencoder import AutoencoderModule
from ldm.lit.images import log_image_grid, save_png, to_uint8_grid
from ldm.losses.autoencoder import AutoencoderLoss
from ldm.nets.autoencoder import AutoencoderKL
from ldm.nets.discriminator import NLayerDiscriminator
from ldm.nets.vq import VQModel

DDCONFIG = dict(
    ch=8,
    ch_mult=[1, 2],
    num_res_blocks=1,
    z_channels=2,
    attn_resolutions=[],
    in_channels=1,
    out_ch=1,
    resolution=16,
    double_z=True,
    use_mid_attn=False,
    norm_num_groups=4,
)


def random_loader(n=8, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 16, 16, generator=generator) * 2 - 1
    return DataLoader([{"image": img, "label": 0} for img in images], batch_size=batch_size)


def fit_fast(module, tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        fast_dev_run=True,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=random_loader(), val_dataloaders=random_loader())
    return trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gan_from_step_zero_steps_both_optimizers(tmp_path):
    torch.manual_seed(0)
    loss = AutoencoderLoss(discriminator=NLayerDiscriminator(1, 8, 1), disc_weight=0.5, disc_start=0)
    module = AutoencoderModule(
        AutoencoderKL(DDCONFIG, embed_dim=2),
        loss,
        optimizer=functools.partial(torch.optim.Adam, betas=(0.5, 0.9)),
        lr=1e-3,
        image_log_every_n_steps=1,
        num_logged_images=2,
    )
    ae_before, disc_before = snapshot(module.autoencoder), snapshot(loss.discriminator)
    trainer = fit_fast(module, tmp_path)

    assert int(module.batches_trained) == 1
    assert trainer.global_step == 2  # Lightning counts both optimizer steps
    ae_after, disc_after = module.autoencoder.state_dict(), loss.discriminator.state_dict()
    assert not torch.equal(ae_before["decoder.conv_out.weight"], ae_after["decoder.conv_out.weight"])
    assert not torch.equal(disc_before["main.0.weight"], disc_after["main.0.weight"])
    metrics = trainer.callback_metrics
    for key in (
        "train/rec_loss",
        "train/kl_loss",
        "train/g_loss",
        "train/d_weight",
        "train/disc_loss",
        "val/rec_loss",
        "val/psnr",
        "val/ssim",
    ):
        assert key in metrics, key
    # PSNR of the logged validation reconstruction, recomputed from scratch
    assert 0.0 < metrics["val/psnr"].item() < 60.0
    # files are named by trainer.global_step, which had counted both optimizer steps by then
    train_png = tmp_path / "images" / "train" / "reconstructions_step0000002.png"
    val_png = tmp_path / "images" / "val" / "reconstructions_step0000002.png"
    assert train_png.is_file() and val_png.is_file()
    assert np.asarray(Image.open(val_png)).shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # 2x2 grid of 16px + padding


def test_without_gan_only_the_autoencoder_optimizer_exists(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(
        AutoencoderKL(DDCONFIG, embed_dim=2),
        AutoencoderLoss(disc_weight=0.0),
        lr=1e-3,
        image_log_every_n_steps=0,
    )
    assert len(module.configure_optimizers()) == 1
    trainer = fit_fast(module, tmp_path)
    assert trainer.global_step == 1
    assert "train/g_loss" not in trainer.callback_metrics
    assert not (tmp_path / "images" / "train").exists()


def test_vq_model_trains_with_codebook_loss(tmp_path):
    torch.manual_seed(0)
    vq = VQModel(dict(DDCONFIG, double_z=False), n_embed=8, embed_dim=2)
    module = AutoencoderModule(vq, AutoencoderLoss(disc_weight=0.0), lr=1e-3, image_log_every_n_steps=0)
    codebook_before = vq.quantize.embedding.weight.detach().clone()
    trainer = fit_fast(module, tmp_path)
    assert not torch.equal(codebook_before, vq.quantize.embedding.weight)
    for key in ("train/codebook_loss", "train/perplexity", "val/codebook_loss", "val/psnr"):
        assert key in trainer.callback_metrics, key


def test_bad_arguments():
    model = AutoencoderKL(DDCONFIG, embed_dim=2)
    with pytest.raises(ValueError, match="lr"):
        AutoencoderModule(model, AutoencoderLoss(disc_weight=0.0), lr=0.0)


def test_to_uint8_grid_maps_range_and_layout():
    images = torch.stack(
        [torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 0.0)]
    )
    grid = to_uint8_grid(images, nrow=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 + 4, 3 * 4 + 2, 3)
    assert (grid[2:4, 2:4] == 0).all() and (grid[2:4, 6:8] == 255).all() and (grid[2:4, 10:12] == 128).all()
    assert (grid[0] == 255).all()  # white padding
    with pytest.raises(ValueError, match="B, 1 or 3"):
        to_uint8_grid(torch.zeros(3, 2, 2), nrow=1)


def test_save_png_round_trip_leaves_no_temp_files(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = save_png(array, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), array)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


def test_log_image_grid_rank_zero_and_wandb(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    class RecordingWandb(WandbLogger):
        def __init__(self):  # no wandb run: only the call is recorded
            self.calls = []

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append((key, images, step, kwargs))

    wandb = RecordingWandb()
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), global_step=42, loggers=[wandb]
    )
    images = torch.zeros(2, 3, 4, 4)
    path = log_image_grid(trainer, "samples", images, nrow=2, caption="hi")
    assert path == tmp_path / "images" / "samples_step0000042.png" and path.is_file()
    ((key, logged, step, kwargs),) = wandb.calls
    assert key == "samples" and step == 42 and kwargs == {"caption": ["hi"]}
    assert np.array_equal(logged[0], to_uint8_grid(images, 2))
    other_rank = SimpleNamespace(**{**vars(trainer), "is_global_zero": False, "global_step": 43})
    assert log_image_grid(other_rank, "samples", images, nrow=2) is None
    assert not (tmp_path / "images" / "samples_step0000043.png").exists()

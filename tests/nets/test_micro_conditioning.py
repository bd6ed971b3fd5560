"""SizeEmbedder (SDXL micro-conditioning): its Fourier features, dropout to the default sizes, errors, and that the
size conditioning of a real bucket batch reaches the UNet through `adm_in_channels`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.folder import ImageFolderDataModule
from ldm.nets.conditioners import Conditioner
from ldm.nets.micro_conditioning import SizeEmbedder
from ldm.nets.unet import TransformerSpec, UNetModel, timestep_embedding


def _sizes(*rows):
    """A batch of (original_size, crop_coords, target_size) rows."""
    return {key: torch.tensor([row[i] for row in rows]) for i, key in
            enumerate(("original_size", "crop_coords", "target_size"))}


def test_each_scalar_gets_its_own_sinusoidal_features_in_sdxl_order():
    embedder = SizeEmbedder(dim=8)
    batch = _sizes(((480, 640), (10, 0), (192, 320)), ((256, 256), (0, 0), (256, 256)))
    out = embedder(batch)
    assert out.shape == (2, 6 * 8) == (2, embedder.output_dim) and embedder.output == "vector"
    scalars = [480, 640, 10, 0, 192, 320]
    expected = torch.cat([timestep_embedding(torch.tensor([float(v)]), 8) for v in scalars], dim=1)
    torch.testing.assert_close(out[0], expected[0])
    assert embedder.batch_keys == ("original_size", "crop_coords", "target_size")
    assert Conditioner([embedder]).spec.vector_dim == 6 * 8  # what the backbone gets as adm_in_channels
    # a subset of keys, in the order given
    only_crop = SizeEmbedder(dim=4, keys=("crop_coords",))
    torch.testing.assert_close(only_crop(batch)[0], torch.cat([timestep_embedding(torch.tensor([v]), 4)
                                                                for v in (10.0, 0.0)], dim=1)[0])


def test_unconditional_and_dropped_samples_ask_for_a_full_uncropped_image():
    embedder = SizeEmbedder(dim=8, default_size=(64, 96), drop_rate=1.0, guided=True).train()
    clean = embedder.eval()(_sizes(((64, 96), (0, 0), (64, 96))))
    embedder.train()
    cropped = _sizes(((30, 500), (7, 3), (48, 80)))
    torch.testing.assert_close(embedder(cropped), clean)  # drop_rate 1: replaced by the defaults
    torch.testing.assert_close(embedder.unconditional(1), clean)
    # Unguided (SDXL's choice): guidance's unconditional branch keeps the sizes.
    unguided = SizeEmbedder(dim=8, default_size=(64, 96))
    assert not torch.allclose(unguided(cropped, force_unconditional=True), clean)
    assert torch.allclose(SizeEmbedder(dim=8, default_size=(64, 96), guided=True)(cropped, force_unconditional=True),
                          clean)


def test_sampling_without_sizes_asks_for_the_default_but_training_without_them_fails():
    embedder = SizeEmbedder(dim=4, default_size=(32, 48)).eval()
    torch.testing.assert_close(embedder({"label": torch.arange(3)}), embedder.unconditional(3))
    with pytest.raises(KeyError, match="data.buckets"):
        embedder.train()({"label": torch.arange(3)})


def test_clear_errors():
    with pytest.raises(KeyError, match="data.buckets"):
        SizeEmbedder(dim=4).eval()({"original_size": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        SizeEmbedder(dim=4, keys=("original_size",))({"original_size": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="even"):
        SizeEmbedder(dim=5)
    with pytest.raises(ValueError, match="distinct"):
        SizeEmbedder(keys=("a", "a"))


def _bucket_batch(tmp_path):
    """One real batch of the folder DataModule on aspect-ratio buckets (wide 3:2 images: bucket 48x80)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    for number, (height, width) in enumerate([(40, 60), (100, 150), (60, 100), (20, 36)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / f"{number}.png")
    dm = ImageFolderDataModule(str(root), image_size=64, batch_size=2, num_workers=0, val_fraction=0.0,
                               random_crop=True, buckets={"step": 16, "max_aspect": 2.0})
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_size_conditioning_of_a_bucket_batch_reaches_the_unet(tmp_path):
    batch = _bucket_batch(tmp_path)
    assert batch["image"].shape == (2, 3, 48, 80)
    embedder = SizeEmbedder(dim=16, default_size=(64, 64))
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     transformer=TransformerSpec(attention_resolutions=(2,), num_heads=2, context_dim=None),
                     adm_in_channels=embedder.output_dim)
    # The output convolution and every ResBlock's last convolution start at zero, so a fresh UNet ignores y
    # (and everything else); random weights stand in for a trained model.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 6, 10)  # an f8 first stage's latents of the 48x80 bucket: non-square
    timesteps = torch.tensor([10.0, 500.0])

    y = embedder(batch).requires_grad_(True)  # (B, 6 * 16)
    out = unet(latents, timesteps, y=y)
    assert out.shape == latents.shape
    out.square().mean().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in unet.label_emb.parameters())

    # Same latents and timesteps, other sizes: another prediction; the same sizes: the same prediction.
    with torch.no_grad():
        other = {**batch, "original_size": batch["original_size"] * 3, "crop_coords": batch["crop_coords"] + 5}
        assert not torch.allclose(unet(latents, timesteps, y=embedder(other)), out.detach(), atol=1e-5)
        torch.testing.assert_close(unet(latents, timesteps, y=embedder(batch)), out.detach())

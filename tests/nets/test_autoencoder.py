"""AutoencoderKL: shapes per downsampling factor, the Gaussian posterior's closed forms, the CompVis key layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.nets.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, EncoderDecoderConfig


def tiny_ddconfig(ch_mult, in_channels=1, z_channels=3, **overrides):
    config = dict(
        ch=16,
        ch_mult=list(ch_mult),
        num_res_blocks=1,
        z_channels=z_channels,
        attn_resolutions=[],
        in_channels=in_channels,
        out_ch=in_channels,
        resolution=32,
        dropout=0.0,
        double_z=True,
        use_mid_attn=False,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


SD_DDCONFIG = dict(
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    z_channels=4,
    attn_resolutions=[],
    in_channels=3,
    out_ch=3,
    resolution=256,
    dropout=0.0,
    double_z=True,
    use_mid_attn=True,
)

# Names and shapes as they appear in the sd-vae-ft-mse (CompVis kl-f8) checkpoint.
SD_VAE_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.down.3.block.1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.block_1.norm1.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.k.bias": (512,),
    "encoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.norm2.bias": (128,),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


@pytest.mark.parametrize(
    "ch_mult,factor", [([1], 1), ([1, 2, 2], 4), ([1, 2, 2, 2], 8), ([1, 1, 2, 2, 2], 16)]
)
def test_shapes_for_each_downsampling_factor(ch_mult, factor):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_ddconfig(ch_mult), embed_dim=3)
    assert model.downsample_factor == factor
    x = torch.randn(2, 1, 32, 32)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 3, 32 // factor, 32 // factor)
    reconstruction, posterior2 = model(x)
    assert reconstruction.shape == x.shape
    assert model.decode(posterior.mode()).shape == x.shape
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_attention_at_listed_resolutions_and_mid():
    model = AutoencoderKL(tiny_ddconfig([1, 2], attn_resolutions=[16], use_mid_attn=True), embed_dim=3)
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    assert "decoder.up.1.attn.1.proj_out.weight" in keys  # decoder levels hold num_res_blocks + 1 blocks
    assert "encoder.mid.attn_1.k.weight" in keys and "decoder.mid.attn_1.v.weight" in keys
    x = torch.randn(1, 1, 32, 32)
    assert model(x)[0].shape == x.shape


def test_sd_shaped_config_has_the_sd_vae_keys_and_shapes():
    with torch.device("meta"):  # the 84M-parameter model without allocating it
        model = AutoencoderKL(SD_DDCONFIG, embed_dim=4)
    state = model.state_dict()
    for key, shape in SD_VAE_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 248  # the number of tensors in the CompVis kl-f8 first-stage checkpoint
    assert not any("temb" in k or "conv_shortcut" in k for k in state)


def test_matches_diffusers_after_their_compvis_conversion():
    """diffusers' single-file converter reads CompVis VAE keys; equal outputs prove layout and maths."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    ddconfig = dict(SD_DDCONFIG, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=32)
    model = AutoencoderKL(ddconfig, embed_dim=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )
    reference = diffusers.AutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(model.state_dict(), config), strict=True)
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ours, theirs = model.encode(x), reference.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.logvar, theirs.logvar, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.decode(z), reference.decode(z).sample, atol=1e-5, rtol=1e-4)


def test_full_sd_config_maps_onto_diffusers_sd_vae():
    """Every key of the SD-shaped model converts to a key of diffusers' SD VAE with the same shape."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        latent_channels=4,
        layers_per_block=2,
        sample_size=256,
    )
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config).state_dict()
        converted = convert_ldm_vae_checkpoint(AutoencoderKL(SD_DDCONFIG, embed_dim=4).state_dict(), config)
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 5)
    posterior = DiagonalGaussianDistribution(moments)
    q = Normal(posterior.mean, posterior.std)
    expected = kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected, atol=1e-5, rtol=1e-5)
    other = DiagonalGaussianDistribution(torch.randn(3, 8, 4, 5))
    expected_pair = kl_divergence(q, Normal(other.mean, other.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(other), expected_pair, atol=1e-4, rtol=1e-5)
    assert posterior.kl().shape == (3,)
    z = posterior.sample()
    torch.testing.assert_close(posterior.nll(z), -q.log_prob(z).sum(dim=(1, 2, 3)), atol=1e-4, rtol=1e-5)


def test_sample_statistics_mode_and_generator():
    mean = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 200, 200)
    logvar = torch.log(torch.tensor([0.25, 4.0])).view(1, 2, 1, 1).expand(1, 2, 200, 200)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    samples = posterior.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples.mean(dim=(0, 2, 3)), torch.tensor([-1.0, 2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(dim=(0, 2, 3)), torch.tensor([0.5, 2.0]), atol=0.02, rtol=0)
    assert torch.equal(posterior.mode(), posterior.mean)
    again = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)


def test_logvar_is_clamped():
    moments = torch.cat(
        [torch.zeros(1, 1, 2, 2), torch.tensor([-100.0, 100.0, 0.0, 5.0]).view(1, 1, 2, 2)], dim=1
    )
    posterior = DiagonalGaussianDistribution(moments)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0, 0.0, 5.0]
    assert math.isfinite(posterior.kl().item())


def test_bad_configs_fail_early():
    with pytest.raises(ValueError, match="unknown ddconfig keys"):
        AutoencoderKL(dict(tiny_ddconfig([1, 2]), attn_type="vanilla"), embed_dim=3)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(tiny_ddconfig([1, 2], double_z=False), embed_dim=3)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(tiny_ddconfig([1, 2], norm_num_groups=32), embed_dim=3)
    model = AutoencoderKL(tiny_ddconfig([1, 2, 2]), embed_dim=3)
    with pytest.raises(ValueError, match="divisible by the downsample factor 4"):
        model.encode(torch.randn(1, 1, 30, 30))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.randn(1, 3, 32, 32))


def test_config_accepts_omegaconf_and_dataclass():
    from omegaconf import OmegaConf

    node = OmegaConf.create(tiny_ddconfig([1, 2]))
    model = AutoencoderKL(node, embed_dim=2)
    assert model.config == EncoderDecoderConfig.from_mapping(tiny_ddconfig([1, 2]))
    assert AutoencoderKL(model.config, embed_dim=2).state_dict().keys() == model.state_dict().keys()

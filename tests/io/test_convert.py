"""Key conversion diffusers <-> ours: randomly initialised diffusers models converted into ours give the same
outputs, ours converted back load strictly into diffusers and give the same outputs again."""

from __future__ import annotations

import pytest
import torch

from ldm.io.convert import (
    ConversionError,
    autoencoder_from_diffusers,
    autoencoder_from_diffusers_config,
    autoencoder_key_map,
    autoencoder_to_diffusers,
    autoencoder_to_diffusers_config,
    unet_from_diffusers,
    unet_from_diffusers_config,
    unet_key_map,
    unet_to_diffusers,
    unet_to_diffusers_config,
)
from ldm.nets.autoencoder import AutoencoderKL, EncoderDecoderConfig
from ldm.nets.unet import UNetModel

diffusers = pytest.importorskip("diffusers")


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (zero-initialised output layers included) so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def _diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------
# autoencoder


VAE_VARIANTS = {
    "sd-like": dict(block_out_channels=[32, 64], layers_per_block=1),
    "three-levels-no-mid-attn": dict(block_out_channels=[32, 32, 64], layers_per_block=2, mid_block_add_attention=False),
    "groups16-latent3": dict(block_out_channels=[16, 32], norm_num_groups=16, latent_channels=3, in_channels=1,
                             out_channels=1),
}


def _diffusers_vae(variant: str, seed: int = 0, **extra):
    levels = len(VAE_VARIANTS[variant]["block_out_channels"])
    config = dict(down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  latent_channels=4, sample_size=16)
    config.update(VAE_VARIANTS[variant], **extra)
    return _randomize(diffusers.AutoencoderKL(**config), seed)


def _assert_same_vae(ours: AutoencoderKL, theirs, channels: int, latent: int, levels: int):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, channels, 16, 16, generator=gen)
    z = torch.randn(2, latent, 16 // 2 ** (levels - 1), 16 // 2 ** (levels - 1), generator=gen)
    with torch.no_grad():
        posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
        decoded, reference_decoded = ours.decode(z), theirs.decode(z).sample
    assert decoded.abs().mean() > 0.05 and posterior.mean.abs().mean() > 0.05
    torch.testing.assert_close(posterior.mean, reference.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.std, reference.std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, reference_decoded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VAE_VARIANTS))
def test_diffusers_autoencoder_into_ours_and_back(variant):
    reference = _diffusers_vae(variant)
    ddconfig, embed_dim = autoencoder_from_diffusers_config(dict(reference.config))
    ours = AutoencoderKL(ddconfig, embed_dim).eval()
    ours.load_state_dict(autoencoder_from_diffusers(reference.state_dict(), ddconfig), strict=True)
    levels, channels = len(ddconfig.ch_mult), ddconfig.in_channels
    _assert_same_vae(ours, reference, channels, embed_dim, levels)

    # ours -> diffusers: the written config rebuilds diffusers' model, the weights load strictly
    config = autoencoder_to_diffusers_config(ddconfig, embed_dim, scaling_factor=0.3)
    assert config["scaling_factor"] == 0.3 and config["_class_name"] == "AutoencoderKL"
    back = diffusers.AutoencoderKL(**_diffusers_kwargs(config)).eval()
    back.load_state_dict(autoencoder_to_diffusers(ours.state_dict(), ddconfig, embed_dim), strict=True)
    _assert_same_vae(ours, back, channels, embed_dim, levels)


def test_diffusers_autoencoder_without_quant_convs_gets_identity_convs():
    reference = _diffusers_vae("sd-like", use_quant_conv=False, use_post_quant_conv=False)
    ddconfig, embed_dim = autoencoder_from_diffusers_config(dict(reference.config))
    ours = AutoencoderKL(ddconfig, embed_dim).eval()
    ours.load_state_dict(autoencoder_from_diffusers(reference.state_dict(), ddconfig), strict=True)
    _assert_same_vae(ours, reference, 3, 4, 2)


def test_legacy_diffusers_attention_names_are_accepted():
    reference = _diffusers_vae("sd-like", seed=2)
    state = reference.state_dict()
    legacy = {}
    for name, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
        legacy[name] = value
    assert any(".query." in k for k in legacy)
    ddconfig, embed_dim = autoencoder_from_diffusers_config(dict(reference.config))
    ours = AutoencoderKL(ddconfig, embed_dim).eval()
    ours.load_state_dict(autoencoder_from_diffusers(legacy, ddconfig), strict=True)
    _assert_same_vae(ours, reference, 3, 4, 2)


def test_autoencoder_key_map_is_a_bijection_onto_diffusers_keys():
    ddconfig = EncoderDecoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=4)
    names = autoencoder_key_map(ddconfig)
    assert len(set(names.values())) == len(names)
    expected = set(diffusers.AutoencoderKL(**_diffusers_kwargs(autoencoder_to_diffusers_config(ddconfig, 4, 1.0))).state_dict())
    assert set(names.values()) == expected
    # the decoder's level order is reversed: our up.0 (full resolution) is diffusers' last up block
    assert names["decoder.up.0.block.0.conv1.weight"] == "decoder.up_blocks.2.resnets.0.conv1.weight"
    assert names["decoder.up.2.upsample.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert names["encoder.mid.attn_1.proj_out.weight"] == "encoder.mid_block.attentions.0.to_out.0.weight"


@pytest.mark.parametrize(
    "ddconfig, embed_dim, match",
    [
        (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, attn_resolutions=(16,)), 4, "attention inside levels"),
        (dict(ch=32, ch_mult=(2, 2), num_res_blocks=1, z_channels=4), 4, "must start with 1"),
        (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8), 4, r"embed_dim \(4\) must equal z_channels \(8\)"),
    ],
)
def test_autoencoders_diffusers_cannot_express_are_refused(ddconfig, embed_dim, match):
    with pytest.raises(ConversionError, match=match):
        autoencoder_to_diffusers_config(ddconfig, embed_dim, 1.0)
    with pytest.raises(ConversionError, match=match):
        autoencoder_to_diffusers({}, ddconfig, embed_dim)


def test_unsupported_diffusers_autoencoder_configs_are_named():
    with pytest.raises(ConversionError, match="act_fn must be silu"):
        autoencoder_from_diffusers_config({"act_fn": "relu"})
    with pytest.raises(ConversionError, match="multiples of the first"):
        autoencoder_from_diffusers_config({"block_out_channels": [32, 48]})
    with pytest.raises(ConversionError, match="AutoencoderKL config"):
        autoencoder_from_diffusers_config({"_class_name": "VQModel"})


def test_key_mismatch_report_lists_missing_and_unexpected():
    reference = _diffusers_vae("sd-like")
    ddconfig, _ = autoencoder_from_diffusers_config(dict(reference.config))
    state = reference.state_dict()
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        autoencoder_from_diffusers(state, ddconfig)
    text = str(err.value)
    assert "missing (1): ['decoder.conv_out.bias']" in text and "unexpected (1): ['decoder.extra.weight']" in text


# ---------------------------------------------------------------------------------------------------
# UNet

UNET_VARIANTS = {
    "sd1-conv": dict(),
    "sd2-linear-scale-shift-depth2": dict(
        block_out_channels=[32, 64, 64], layers_per_block=2, attention_head_dim=[2, 4, 4], use_linear_projection=True,
        transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift",
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    "class-labels": dict(num_class_embeds=5),
    "adm-projection": dict(class_embed_type="projection", projection_class_embeddings_input_dim=6, in_channels=6),
}


def _diffusers_unet(variant: str):
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                  cross_attention_dim=16, attention_head_dim=2)
    config.update(UNET_VARIANTS[variant])
    return _randomize(diffusers.UNet2DConditionModel(**config), seed=1)


def _assert_same_unet(ours: UNetModel, theirs, variant: str):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, ours.in_channels, 8, 8, generator=gen)
    ctx, t = torch.randn(2, 3, 16, generator=gen), torch.tensor([5, 731])
    y = {"class-labels": torch.tensor([1, 4]), "adm-projection": torch.randn(2, 6, generator=gen)}.get(variant)
    with torch.no_grad():
        out = ours(x, t, context=ctx, y=y)
        reference = theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert out.abs().mean() > 0.05
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_diffusers_unet_into_ours_and_back(variant):
    reference = _diffusers_unet(variant)
    kwargs = unet_from_diffusers_config(dict(reference.config))
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), kwargs), strict=True)
    _assert_same_unet(ours, reference, variant)

    config = unet_to_diffusers_config(kwargs, sample_size=8)
    back = diffusers.UNet2DConditionModel(**_diffusers_kwargs(config)).eval()
    back.load_state_dict(unet_to_diffusers(ours.state_dict(), kwargs), strict=True)
    _assert_same_unet(ours, back, variant)


def test_unet_head_layout_is_recovered():
    sd2 = unet_from_diffusers_config(dict(_diffusers_unet("sd2-linear-scale-shift-depth2").config))
    assert sd2["transformer"] == {"attention_resolutions": [1, 2], "num_heads": None, "num_head_channels": 16,
                                  "transformer_depth": 2, "context_dim": 16, "use_linear_in_transformer": True}
    assert sd2["use_scale_shift_norm"] and sd2["num_res_blocks"] == 2 and sd2["channel_mult"] == [1, 2, 2]
    sd1 = unet_from_diffusers_config(dict(_diffusers_unet("sd1-conv").config))
    assert sd1["transformer"]["num_heads"] == 2 and sd1["transformer"]["attention_resolutions"] == [1]


def test_unet_key_map_names_sd_layout_like_diffusers():
    kwargs = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=2,
                  transformer=dict(attention_resolutions=[1, 2], num_heads=2, context_dim=16))
    names = unet_key_map(kwargs)
    assert len(set(names.values())) == len(names)
    assert names["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert names["input_blocks.4.1.proj_in.weight"] == "down_blocks.1.attentions.0.proj_in.weight"
    assert names["output_blocks.2.2.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert names["output_blocks.3.0.skip_connection.weight"] == "up_blocks.1.resnets.0.conv_shortcut.weight"
    assert names["middle_block.2.emb_layers.1.bias"] == "mid_block.resnets.1.time_emb_proj.bias"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"resblock_updown": True}, "resblock_updown"),
        ({"transformer": None}, "no transformers"),
        ({"transformer": dict(attention_resolutions=[1], num_heads=2, context_dim=None)}, "without context_dim"),
    ],
)
def test_unets_diffusers_cannot_express_are_refused(overrides, match):
    kwargs = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                  transformer=dict(attention_resolutions=[1], num_heads=2, context_dim=16))
    kwargs.update(overrides)
    with pytest.raises(ConversionError, match=match):
        unet_to_diffusers_config(kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"attention_head_dim": [2, 3]}, "neither constant heads nor constant head width"),
        ({"mid_block_type": "UNetMidBlock2D"}, "only UNetMidBlock2DCrossAttn converts"),
        ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "must mirror"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"layers_per_block": [1, 2]}, "equal at every level"),
    ],
)
def test_unsupported_diffusers_unet_configs_are_named(overrides, match):
    config = dict(_diffusers_unet("sd1-conv").config)
    config.update(overrides)
    with pytest.raises(ConversionError, match=match):
        unet_from_diffusers_config(config)

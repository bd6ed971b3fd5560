"""Autoencoder (first stage): our CompVis-layout ``AutoencoderKL`` <-> diffusers' ``AutoencoderKL``.

Pure renaming except the attention projections, which are 1x1 convolutions here and linear layers in
diffusers (a reshape). diffusers' own names before 0.14 are read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.io.convert.common import ConversionError, as_list, rename
from ldm.nets.autoencoder import AutoencoderKL, EncoderDecoderConfig

_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers' own AutoencoderKL attention before 0.14; folders saved back then still use them.
_VAE_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def check_diffusers_autoencoder(config: EncoderDecoderConfig, embed_dim: int) -> None:
    """diffusers' AutoencoderKL has no attention inside levels, starts at ch_mult 1 and has embed_dim == z."""
    problems = []
    if config.attn_resolutions:
        problems.append(
            f"attention inside levels (attn_resolutions={list(config.attn_resolutions)}; must be [])"
        )
    if config.ch_mult[0] != 1:
        problems.append(f"ch_mult must start with 1 (got {list(config.ch_mult)})")
    if embed_dim != config.z_channels:
        problems.append(f"embed_dim ({embed_dim}) must equal z_channels ({config.z_channels})")
    if problems:
        raise ConversionError(
            "diffusers' AutoencoderKL cannot express this autoencoder: " + "; ".join(problems)
        )


def autoencoder_key_map(config: EncoderDecoderConfig | Mapping[str, Any]) -> dict[str, str]:
    """Every state-dict key of our AutoencoderKL -> its diffusers name (for a diffusers-expressible config)."""
    config = EncoderDecoderConfig.from_mapping(config)
    levels = len(config.ch_mult)
    prefixes: dict[str, str] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            prefixes[f"{part}.{name}"] = f"{part}.{name}"
        prefixes[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        prefixes[f"{part}.mid.block_1"] = f"{part}.mid_block.resnets.0"
        prefixes[f"{part}.mid.block_2"] = f"{part}.mid_block.resnets.1"
        prefixes[f"{part}.mid.attn_1"] = f"{part}.mid_block.attentions.0"
    for i in range(levels):
        for j in range(config.num_res_blocks):
            prefixes[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
        prefixes[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        # decoder.up[i] is the level of resolution i; diffusers' up_blocks run in execution order.
        for j in range(config.num_res_blocks + 1):
            prefixes[f"decoder.up.{i}.block.{j}"] = f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}"
        prefixes[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv"

    names: dict[str, str] = {}
    for key in _autoencoder_keys(config):
        stem, _, leaf = key.rpartition(".")  # leaf: weight / bias
        head, _, module = stem.rpartition(".")
        if head.endswith("attn_1"):
            names[key] = f"{prefixes[head]}.{_VAE_ATTN[module]}.{leaf}"
        elif stem in prefixes:
            names[key] = f"{prefixes[stem]}.{leaf}"
        else:
            names[key] = f"{prefixes[head]}.{_VAE_RESNET.get(module, module)}.{leaf}"
    return names


def _autoencoder_keys(config: EncoderDecoderConfig) -> list[str]:
    with torch.device("meta"):  # names only: no memory, no init cost
        return list(AutoencoderKL(config, config.z_channels).state_dict())


def autoencoder_to_diffusers(
    state: Mapping[str, torch.Tensor], config, embed_dim: int
) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict -> diffusers AutoencoderKL state dict."""
    config = EncoderDecoderConfig.from_mapping(config)
    check_diffusers_autoencoder(config, embed_dim)
    out = rename(state, autoencoder_key_map(config), "our autoencoder")
    for name, value in out.items():
        if ".mid_block.attentions." in name and value.ndim == 4:
            out[name] = value[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear
    return out


def autoencoder_from_diffusers(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ours. Missing quant convs (``use_quant_conv=False``) become identities."""
    config = EncoderDecoderConfig.from_mapping(config)
    state = dict(state)
    for name in list(state):
        stem, _, leaf = name.rpartition(".")
        head, _, module = stem.rpartition(".")
        if ".mid_block.attentions." in name and module in _VAE_ATTN_LEGACY:
            state[f"{head}.{_VAE_ATTN_LEGACY[module]}.{leaf}"] = state.pop(name)
    for name, channels in (("quant_conv", 2 * config.z_channels), ("post_quant_conv", config.z_channels)):
        if f"{name}.weight" not in state:
            state[f"{name}.weight"] = torch.eye(channels)[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(channels)
    inverse = {d: o for o, d in autoencoder_key_map(config).items()}
    out = rename(state, inverse, "the diffusers autoencoder")
    for name, value in out.items():
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            out[name] = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
    return out


def autoencoder_to_diffusers_config(
    config, embed_dim: int, scaling_factor: float, sample_size: int | None = None
) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config.json for our autoencoder."""
    config = EncoderDecoderConfig.from_mapping(config)
    check_diffusers_autoencoder(config, embed_dim)
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": int(sample_size or config.resolution),
        "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": config.use_mid_attn,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def autoencoder_from_diffusers_config(config: Mapping[str, Any]) -> tuple[EncoderDecoderConfig, int]:
    """(ddconfig, embed_dim) of our AutoencoderKL for a diffusers ``AutoencoderKL`` config.json."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConversionError(
            f"expected a diffusers AutoencoderKL config, got _class_name={config['_class_name']!r}"
        )
    blocks = [int(c) for c in config.get("block_out_channels", (64,))]
    problems = []
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = set(config.get(key, [allowed]))
        if types != {allowed}:
            problems.append(f"{key} must all be {allowed}, got {sorted(types)}")
    if config.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn must be silu, got {config['act_fn']!r}")
    if any(c % blocks[0] for c in blocks):
        problems.append(f"block_out_channels {blocks} must be multiples of the first")
    if problems:
        raise ConversionError("cannot convert this diffusers AutoencoderKL: " + "; ".join(problems))
    latent = int(config.get("latent_channels", 4))
    ddconfig = EncoderDecoderConfig(
        ch=blocks[0],
        ch_mult=tuple(c // blocks[0] for c in blocks),
        num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=latent,
        attn_resolutions=(),
        in_channels=int(config.get("in_channels", 3)),
        out_ch=int(config.get("out_channels", 3)),
        resolution=int(as_list(config.get("sample_size", 256))[0]),
        use_mid_attn=bool(config.get("mid_block_add_attention", True)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
    )
    return ddconfig, latent

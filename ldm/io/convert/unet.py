"""UNet: our CompVis-layout ``UNetModel`` <-> diffusers' ``UNet2DConditionModel``, keys and configs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldm.io.convert.common import ConversionError, as_list, per_level, rename
from ldm.nets.unet import UNetModel

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb": "class_embedding",
    "label_emb.0.0": "class_embedding.linear_1",
    "label_emb.0.2": "class_embedding.linear_2",
}
# diffusers settings our UNetModel has no counterpart for: only their default values convert.
_UNET_DEFAULTS = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "addition_embed_type": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}


def unet_key_map(unet_kwargs: Mapping[str, Any]) -> dict[str, str]:
    """Every state-dict key of ``UNetModel(**unet_kwargs)`` -> its diffusers UNet2DConditionModel name."""
    per_level = int(unet_kwargs["num_res_blocks"]) + 1
    has_mid_attention = unet_kwargs.get("transformer") is not None
    names = {}
    for key in _unet_keys(unet_kwargs):
        stem, _, leaf = key.rpartition(".")
        if stem in _UNET_FIXED:
            names[key] = f"{_UNET_FIXED[stem]}.{leaf}"
            continue
        match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.?(\d*)\.(.*)", key)
        if match is None:
            raise ConversionError(f"no diffusers name for UNet key {key!r}")
        part, a, b, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if part == "middle_block":
            rest = f"{b}.{rest}" if b else rest
            layer = {0: "resnets.0", 1: "attentions.0" if has_mid_attention else "resnets.1", 2: "resnets.1"}[
                a
            ]
            names[key] = f"mid_block.{layer}.{_resnet_leaf(rest) if 'resnets' in layer else rest}"
            continue
        index = int(b)
        if part == "input_blocks":
            level, j = divmod(a - 1, per_level)
            if j == per_level - 1:  # the downsampler closing a level
                names[key] = f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
                continue
            block = f"down_blocks.{level}"
        else:
            level, j = divmod(a, per_level)
            block = f"up_blocks.{level}"
            if index > 0 and rest.startswith("conv."):  # Upsample after the last block of a level
                names[key] = f"{block}.upsamplers.0.{rest}"
                continue
        names[key] = (
            f"{block}.resnets.{j}.{_resnet_leaf(rest)}" if index == 0 else f"{block}.attentions.{j}.{rest}"
        )
    return names


def _resnet_leaf(rest: str) -> str:
    for ours, theirs in _UNET_RESNET.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    raise ConversionError(f"unexpected ResBlock parameter {rest!r}")


def _unet_keys(unet_kwargs: Mapping[str, Any]) -> list[str]:
    with torch.device("meta"):
        return list(UNetModel(**unet_kwargs).state_dict())


def check_diffusers_unet(unet_kwargs: Mapping[str, Any]) -> None:
    problems = []
    if unet_kwargs.get("resblock_updown"):
        problems.append("resblock_updown=true (diffusers' cross-attention blocks resample with convolutions)")
    spec = _spec(unet_kwargs)
    if spec is None:
        # UNet2DConditionModel's attention-free mid block has one ResBlock, ours two.
        problems.append("no transformers (diffusers' conditional UNet needs its cross-attention mid block)")
    elif spec.get("context_dim") is None:
        problems.append("transformers without context_dim (diffusers' transformers always cross-attend)")
    if problems:
        raise ConversionError("UNet2DConditionModel cannot express this UNet: " + "; ".join(problems))


def _spec(unet_kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    spec = unet_kwargs.get("transformer")
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return dict(spec)
    return {
        k: getattr(spec, k)
        for k in (
            "attention_resolutions",
            "num_heads",
            "num_head_channels",
            "transformer_depth",
            "context_dim",
            "use_linear_in_transformer",
        )
    }


def unet_to_diffusers(
    state: Mapping[str, torch.Tensor], unet_kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Our UNetModel state dict -> diffusers UNet2DConditionModel state dict."""
    check_diffusers_unet(unet_kwargs)
    return rename(state, unet_key_map(unet_kwargs), "our UNet")


def unet_from_diffusers(
    state: Mapping[str, torch.Tensor], unet_kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> ours (``unet_kwargs`` from ``unet_from_diffusers_config``)."""
    inverse = {d: o for o, d in unet_key_map(unet_kwargs).items()}
    return rename(state, inverse, "the diffusers UNet")


def unet_to_diffusers_config(unet_kwargs: Mapping[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """UNet2DConditionModel config.json for ``UNetModel(**unet_kwargs)``."""
    check_diffusers_unet(unet_kwargs)
    spec, mc = _spec(unet_kwargs), int(unet_kwargs["model_channels"])
    mult = [int(m) for m in unet_kwargs["channel_mult"]]
    attn_levels = [2**i in spec["attention_resolutions"] for i in range(len(mult))]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(sample_size),
        "in_channels": int(unet_kwargs["in_channels"]),
        "out_channels": int(unet_kwargs["out_channels"]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        "block_out_channels": [mc * m for m in mult],
        "layers_per_block": int(unet_kwargs["num_res_blocks"]),
        "dropout": float(unet_kwargs.get("dropout", 0.0)),
        "resnet_time_scale_shift": "scale_shift" if unet_kwargs.get("use_scale_shift_norm") else "default",
        **{k: v for k, v in _UNET_DEFAULTS.items() if k != "num_attention_heads"},
    }
    # diffusers' attention_head_dim is the number of heads per level (its documented naming quirk).
    heads = spec["num_heads"] if spec.get("num_heads") not in (None, -1) else None
    config["attention_head_dim"] = heads or [max(1, mc * m // spec["num_head_channels"]) for m in mult]
    config["cross_attention_dim"] = int(spec["context_dim"])
    config["transformer_layers_per_block"] = int(spec.get("transformer_depth", 1))
    config["use_linear_projection"] = bool(spec.get("use_linear_in_transformer", False))
    if unet_kwargs.get("num_classes") is not None:
        config["num_class_embeds"] = int(unet_kwargs["num_classes"])
    if unet_kwargs.get("adm_in_channels") is not None:
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = int(unet_kwargs["adm_in_channels"])
    return config


def unet_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``UNetModel`` kwargs (transformer as a plain mapping) for a UNet2DConditionModel config.json."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConversionError(
            f"expected a UNet2DConditionModel config, got _class_name={config['_class_name']!r}"
        )
    settings = {**config, "only_cross_attention": any(as_list(config.get("only_cross_attention", False)))}
    problems = [
        f"{k}={settings[k]!r} (only {v!r} converts)"
        for k, v in _UNET_DEFAULTS.items()
        if k in settings and settings[k] != v
    ]
    if config.get("mid_block_only_cross_attention"):
        problems.append("mid_block_only_cross_attention=True")
    blocks = [int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280))]
    levels, mc = len(blocks), blocks[0]
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or set(up) - {"CrossAttnUpBlock2D", "UpBlock2D"}:
        problems.append(f"block types {down} / {up} (only CrossAttn/plain Down/UpBlock2D convert)")
    elif [t == "CrossAttnUpBlock2D" for t in reversed(up)] != attn:
        problems.append(f"up_block_types {up} must mirror down_block_types {down}")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":  # diffusers' other mid blocks have one ResBlock or other attention
        problems.append(f"mid_block_type={mid!r} (only UNetMidBlock2DCrossAttn converts)")
    if any(c % mc for c in blocks):
        problems.append(f"block_out_channels {blocks} must be multiples of the first")
    layers = set(per_level(config.get("layers_per_block", 2), levels, "layers_per_block"))
    if len(layers) != 1:
        problems.append(f"layers_per_block must be equal at every level, got {sorted(layers)}")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={shift!r}")
    class_type = config.get("class_embed_type")
    if class_type not in (None, "projection"):
        problems.append(f"class_embed_type={class_type!r}")
    spec, spec_problems = _transformer_from_diffusers(config, blocks, attn)
    problems += spec_problems
    if problems:
        raise ConversionError("cannot convert this UNet2DConditionModel: " + "; ".join(problems))
    return {
        "in_channels": int(config.get("in_channels", 4)),
        "out_channels": int(config.get("out_channels", 4)),
        "model_channels": mc,
        "channel_mult": [c // mc for c in blocks],
        "num_res_blocks": layers.pop(),
        "transformer": spec,
        "use_scale_shift_norm": shift == "scale_shift",
        "resblock_updown": False,
        "dropout": float(config.get("dropout", 0.0)),
        "num_classes": None if class_type else config.get("num_class_embeds"),
        "adm_in_channels": config.get("projection_class_embeddings_input_dim") if class_type else None,
    }


def _transformer_from_diffusers(config: Mapping[str, Any], blocks: list[int], attn: list[bool]):
    levels, problems = len(blocks), []
    used = [i for i in range(levels) if attn[i]] + [
        levels - 1
    ]  # the mid block uses the last level's settings
    heads = [per_level(config.get("attention_head_dim", 8), levels, "attention_head_dim")[i] for i in used]
    channels = [blocks[i] for i in used]
    num_heads = num_head_channels = None
    if len(set(heads)) == 1:
        num_heads = int(heads[0])
    elif len({c // h for c, h in zip(channels, heads)}) == 1 and all(
        c % h == 0 for c, h in zip(channels, heads)
    ):
        num_head_channels = channels[0] // heads[0]
    else:
        problems.append(f"attention_head_dim {heads} is neither constant heads nor constant head width")
    depth = {
        int(per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers")[i])
        for i in used
    }
    context = set(per_level(config.get("cross_attention_dim", 1280), levels, "cross_attention_dim"))
    if len(depth) != 1:
        problems.append(
            f"transformer_layers_per_block must be equal at attention levels, got {sorted(depth)}"
        )
    if len(context) != 1 or None in context:
        problems.append(f"cross_attention_dim must be one int, got {sorted(context, key=str)}")
    if problems:
        return None, problems
    spec = {
        "attention_resolutions": [2**i for i in range(levels) if attn[i]],
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "transformer_depth": depth.pop(),
        "context_dim": int(context.pop()),
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
    }
    return spec, []

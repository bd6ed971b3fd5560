"""DiT: our official-layout ``DiT`` (ldm.nets.dit) <-> diffusers' ``DiTTransformer2DModel``, keys and configs.

Our state dict *is* the facebookresearch/DiT layout, so official checkpoints need no conversion. diffusers
holds the same tensors differently:
  - the timestep/class embedders live inside every block's AdaLayerNormZero (`transformer_blocks.N.norm1.emb`),
    one copy per block, and the final layer reads block 0's copy: we write one copy per block and, reading,
    require the copies to be equal (a diffusers-trained DiT whose copies drifted apart has no DiT form);
  - the fused `attn.qkv` is split into `attn1.to_q/to_k/to_v` (rows q | k | v);
  - `pos_embed` is a non-persistent buffer there: dropped on the way out, rebuilt from the config on the way in.
Numerically diffusers' DiT differs from official DiT in two settings it has no switch for: timestep
frequencies (`downscale_freq_shift=1`: our `timestep_freq_shift=1`) and the pre-MLP LayerNorm eps (its
`norm_eps`, default 1e-5; ours 1e-6 as official DiT, written into the exported config).

diffusers itself is never imported: it is a test-only dependency, used there as the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.io.convert.common import ConversionError, key_report
from ldm.nets.dit import DiT, sincos_pos_embed_2d

_EMB = "norm1.emb."
# ours -> diffusers, per block; the embedders are shared by all blocks and repeated there
_SHARED = {
    "t_embedder.mlp.0": _EMB + "timestep_embedder.linear_1",
    "t_embedder.mlp.2": _EMB + "timestep_embedder.linear_2",
    "y_embedder.embedding_table": _EMB + "class_embedder.embedding_table",
}
_BLOCK = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_FIXED = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_QKV = ("to_q", "to_k", "to_v")
# diffusers settings our DiT has no counterpart for: only these values convert
_DIFFUSERS_FIXED = {
    "dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate", "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
}


def dit_kwargs(model: DiT) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (presets included) as ``DiT(**kwargs)``."""
    return {
        "input_size": model.input_size, "patch_size": model.patch_size, "in_channels": model.in_channels,
        "out_channels": model.out_channels // 2 if model.learn_sigma else model.out_channels,
        "hidden_size": model.hidden_size, "depth": model.depth, "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio, "num_classes": model.num_classes, "adm_in_channels": model.adm_in_channels,
        "context_dim": model.context_dim, "learn_sigma": model.learn_sigma,
        "timestep_freq_shift": model.timestep_freq_shift,
    }


def check_diffusers_dit(kwargs: Mapping[str, Any]) -> None:
    """Raise a ConversionError naming every setting DiTTransformer2DModel cannot express."""
    problems = []
    if kwargs.get("num_classes") is None:
        problems.append("it is class-conditional only: set num_classes")
    if kwargs.get("adm_in_channels") is not None:
        problems.append(f"it has no vector conditioning (adm_in_channels={kwargs['adm_in_channels']})")
    if kwargs.get("context_dim") is not None:
        problems.append(f"it has no cross-attention (context_dim={kwargs['context_dim']})")
    if float(kwargs.get("mlp_ratio", 4.0)) != 4.0:
        problems.append(f"its MLP ratio is 4, not {kwargs['mlp_ratio']}")
    if int(kwargs.get("timestep_freq_shift", 0)) != 1:
        problems.append("its timestep frequencies are max_period^(-i/(half-1)): build the DiT with "
                        "timestep_freq_shift=1 (official DiT weights use 0 and only approximate it)")
    if problems:
        raise ConversionError("diffusers' DiTTransformer2DModel cannot hold this DiT: " + "; ".join(problems) + ".")


def dit_to_diffusers_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """DiTTransformer2DModel config.json for ``DiT(**kwargs)`` (see ``dit_kwargs``)."""
    check_diffusers_dit(kwargs)
    hidden, heads = int(kwargs["hidden_size"]), int(kwargs["num_heads"])
    out = int(kwargs.get("out_channels") or kwargs["in_channels"]) * (2 if kwargs.get("learn_sigma") else 1)
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": int(kwargs["in_channels"]), "out_channels": out, "num_layers": int(kwargs["depth"]),
        "sample_size": int(kwargs["input_size"]), "patch_size": int(kwargs["patch_size"]),
        # diffusers' table holds num_embeds_ada_norm classes + its null row; ours counts the null row
        "num_embeds_ada_norm": int(kwargs["num_classes"]) - 1,
        "norm_eps": 1e-6, **_DIFFUSERS_FIXED,
    }


def dit_from_diffusers_config(config: Mapping[str, Any], learn_sigma: bool | None = None) -> dict[str, Any]:
    """``DiT`` kwargs for a DiTTransformer2DModel config.json. learn_sigma: None = guess it from
    out_channels == 2 * in_channels (as facebook/DiT-XL-2-256), else split out_channels accordingly.
    Its `norm_eps` (pre-MLP LayerNorm only, default 1e-5) becomes our 1e-6: a relative change of ~1e-5 / var."""
    wrong = {k: config[k] for k, v in _DIFFUSERS_FIXED.items() if k in config and config[k] != v}
    if config.get("num_embeds_ada_norm") is None:
        wrong["num_embeds_ada_norm"] = None
    if wrong:
        raise ConversionError(f"diffusers DiT config settings our DiT cannot reproduce: {wrong}.")
    in_ch = int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels") or in_ch)
    if learn_sigma is None:
        learn_sigma = out_ch == 2 * in_ch
    if learn_sigma and out_ch % 2:
        raise ConversionError(f"learn_sigma needs an even out_channels, got {out_ch}.")
    heads = int(config.get("num_attention_heads", 16))
    return {
        "input_size": int(config.get("sample_size", 32)), "patch_size": int(config.get("patch_size", 2)),
        "in_channels": in_ch, "out_channels": out_ch // 2 if learn_sigma else out_ch,
        "hidden_size": heads * int(config.get("attention_head_dim", 72)), "depth": int(config.get("num_layers", 28)),
        "num_heads": heads, "mlp_ratio": 4.0, "num_classes": int(config["num_embeds_ada_norm"]) + 1,
        "adm_in_channels": None, "context_dim": None, "learn_sigma": learn_sigma, "timestep_freq_shift": 1,
    }


def _suffixes(prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}.weight", "weight"), (f"{prefix}.bias", "bias")]


def dit_to_diffusers_state_dict(state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our (= official) DiT state dict -> DiTTransformer2DModel state dict."""
    check_diffusers_dit(kwargs)
    key_report(set(_shapes_only(kwargs)), set(state), "our DiT")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _FIXED.items():
        for key, leaf in _suffixes(ours):
            out[f"{theirs}.{leaf}"] = state[key]
    for i in range(int(kwargs["depth"])):
        block = f"transformer_blocks.{i}."
        for ours, theirs in _SHARED.items():
            for key, leaf in _suffixes(ours):
                if key in state:  # the embedding table has no bias
                    out[f"{block}{theirs}.{leaf}"] = state[key]
        for ours, theirs in _BLOCK.items():
            for key, leaf in _suffixes(f"blocks.{i}.{ours}"):
                out[f"{block}{theirs}.{leaf}"] = state[key]
        for leaf in ("weight", "bias"):
            for name, part in zip(_QKV, state[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3, dim=0)):
                out[f"{block}attn1.{name}.{leaf}"] = part
    return out


def dit_from_diffusers_state_dict(
    state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel state dict -> ours (kwargs from ``dit_from_diffusers_config``)."""
    depth = int(kwargs["depth"])
    reference = dit_to_diffusers_state_dict(_shapes_only(kwargs), kwargs)
    key_report(set(reference), set(state), "the diffusers DiT")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _FIXED.items():
        for key, leaf in _suffixes(ours):
            out[key] = state[f"{theirs}.{leaf}"]
    for ours, theirs in _SHARED.items():
        for key, leaf in _suffixes(ours):
            name = f"{theirs}.{leaf}"
            if f"transformer_blocks.0.{name}" not in state:
                continue
            copies = [state[f"transformer_blocks.{i}.{name}"] for i in range(depth)]
            if not all(torch.equal(copies[0], c) for c in copies[1:]):
                raise ConversionError(f"diffusers DiT blocks hold different `{name}`; official DiT shares one "
                                      "timestep/class embedder across blocks, so these weights have no DiT form.")
            out[key] = copies[0]
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK.items():
            for key, leaf in _suffixes(f"blocks.{i}.{ours}"):
                out[key] = state[f"{block}{theirs}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([state[f"{block}attn1.{n}.{leaf}"] for n in _QKV])
    grid = int(kwargs["input_size"]) // int(kwargs["patch_size"])
    out["pos_embed"] = sincos_pos_embed_2d(int(kwargs["hidden_size"]), grid, grid, grid, grid)
    return out


def _shapes_only(kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict of ``DiT(**kwargs)``'s keys with empty tensors (meta device: no memory, no init)."""
    with torch.device("meta"):
        return DiT(**kwargs).state_dict()

"""Public checkpoints in: CompVis / Stable Diffusion single files and diffusers AutoencoderKL folders.

A CompVis (SD-1.x/2.x) single file holds every part under a prefix: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (autoencoder), ``cond_stage_model.*`` (condition encoder), plus schedule buffers
and ``model_ema.*``. Our modules keep those key names, so loading a part is prefix stripping followed by a
strict load with a readable report (``load_state_strict``). The model config comes from the original
CompVis yaml (``model.params.unet_config.params``, ``first_stage_config.params``) or, where that is
missing, from the tensor shapes.

Nothing is ever unpickled: ``.safetensors`` is read by safetensors, ``.ckpt``/``.pt``/``.bin`` only by
``torch.load(weights_only=True)``, which refuses any object that is not a tensor or a plain container.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule
from ldm.io.convert import autoencoder_from_diffusers, autoencoder_from_diffusers_config
from ldm.io.export import ExportError, frozen, load_state_strict
from ldm.nets.autoencoder import AutoencoderKL, EncoderDecoderConfig
from ldm.nets.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")


class UnsafeCheckpointError(ExportError):
    """A pickle checkpoint that holds more than tensors: refused, never unpickled."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (a Lightning/CompVis ``state_dict`` entry is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ExportError(f"{path} is not a readable safetensors file: {err}") from err
    if suffix not in TORCH_SUFFIXES:
        raise ExportError(f"{path}: unknown checkpoint type {suffix!r}; expected {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}")
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise ExportError(f"{path} holds no tensors (expected a state dict, or a dict with a 'state_dict' entry)")
    return tensors


def load_torch_file(path: Path, allowed: Sequence[type] = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a pickle checkpoint. ``allowed``: the few plain classes a known format
    stores besides tensors (DiT's train.py: ``argparse.Namespace``); anything else is refused. mmap: tensors are
    read lazily from the file where it is a zip archive (what torch >= 1.6 writes), so a multi-GB file whose
    shapes are all that is wanted costs no memory."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # name the offending object (torch's "Unsupported global: GLOBAL posix.system ..." line), if given
        culprit = next((line.strip().split(". ")[0] for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds Python objects besides tensors, and unpickling them could run "
            f"arbitrary code. Convert it to .safetensors in a trusted environment, or get a .safetensors "
            f"release. {culprit}".rstrip(". ") + "."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ExportError(f"{path} is not a readable torch checkpoint: {err}") from err


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# configs from tensor shapes


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ExportError(f"no {key!r} among the weights: not a CompVis {what} state dict (wrong prefix?)")
    return sd[key]


def unet_kwargs_from_state_dict(
    sd: Mapping[str, torch.Tensor], num_heads: int | None = None, num_head_channels: int | None = None
) -> dict[str, Any]:
    """``UNetModel`` kwargs read off the shapes of a ``model.diffusion_model.*`` state dict (prefix stripped).

    Head counts leave no trace in shapes: without ``num_heads``/``num_head_channels`` the SD convention is
    assumed (conv projections: 8 heads as SD-1.x; linear projections: 64-channel heads as SD-2.x). A context
    width equal to every transformer's own width is read as cross-attention context, not self-attention.
    """
    model_channels, in_channels = _need(sd, "input_blocks.0.0.weight", "UNet").shape[:2]
    outputs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("output_blocks.")})
    # an output block resamples when a module after its ResBlock is an Upsample conv or an up-ResBlock
    ups = [n for n in outputs if any(re.match(rf"output_blocks\.{n}\.[12]\.(conv|in_layers)\.", k) for k in sd)]
    levels = len(ups) + 1
    if not outputs or len(outputs) % levels:
        raise ExportError(f"cannot read the level structure: {len(outputs)} output blocks for {levels} levels")
    per_level = len(outputs) // levels
    mult = [int(sd[f"output_blocks.{(levels - 1 - i) * per_level}.0.out_layers.3.weight"].shape[0]) // model_channels
            for i in range(levels)]
    res_out = sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
    kwargs: dict[str, Any] = {
        "in_channels": int(in_channels), "out_channels": int(_need(sd, "out.2.weight", "UNet").shape[0]),
        "model_channels": int(model_channels), "channel_mult": mult, "num_res_blocks": per_level - 1,
        "transformer": None, "use_scale_shift_norm": sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * res_out,
        "resblock_updown": any(re.match(r"output_blocks\.\d+\.[12]\.in_layers\.", k) for k in sd),
        "num_classes": int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None,
        "adm_in_channels": int(sd["label_emb.0.0.weight"].shape[1]) if "label_emb.0.0.weight" in sd else None,
    }
    if "middle_block.1.proj_in.weight" in sd:
        kwargs["transformer"] = _transformer_from_shapes(sd, levels, per_level, num_heads, num_head_channels)
    return kwargs


def _transformer_from_shapes(sd, levels, per_level, num_heads, num_head_channels) -> dict[str, Any]:
    linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    if num_heads is None and num_head_channels is None:
        num_heads, num_head_channels = (None, 64) if linear else (8, None)
    depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
    to_k = [v.shape for k, v in sd.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    self_attention = all(s[0] == s[1] for s in to_k) and len({s[0] for s in to_k}) > 1
    contexts = {int(s[1]) for s in to_k}
    if not self_attention and len(contexts) != 1:
        raise ExportError(f"transformers see context widths {sorted(contexts)}; only one context_dim is supported")
    return {
        "attention_resolutions": [2**i for i in range(levels) if f"input_blocks.{1 + i * per_level}.1.proj_in.weight" in sd],
        "num_heads": num_heads, "num_head_channels": num_head_channels, "transformer_depth": depth,
        "context_dim": None if self_attention else contexts.pop(), "use_linear_in_transformer": linear,
    }


def autoencoder_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], norm_num_groups: int = 32, resolution: int = 256
) -> tuple[EncoderDecoderConfig, int]:
    """(ddconfig, embed_dim) read off a first-stage state dict (prefix stripped). GroupNorm groups leave no
    trace in shapes (SD uses 32); attention resolutions are stated relative to ``resolution``."""
    ch, in_channels = _need(sd, "encoder.conv_in.weight", "autoencoder").shape[:2]
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    z_channels = int(_need(sd, "decoder.conv_in.weight", "autoencoder").shape[1])
    ddconfig = EncoderDecoderConfig(
        ch=int(ch), num_res_blocks=blocks, z_channels=z_channels, in_channels=int(in_channels),
        ch_mult=tuple(int(sd[f"encoder.down.{i}.block.{blocks - 1}.conv2.weight"].shape[0]) // ch for i in range(levels)),
        attn_resolutions=tuple(resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd),
        out_ch=int(_need(sd, "decoder.conv_out.weight", "autoencoder").shape[0]), resolution=resolution,
        double_z=sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
        use_mid_attn="encoder.mid.attn_1.q.weight" in sd, norm_num_groups=norm_num_groups,
    )
    return ddconfig, int(_need(sd, "post_quant_conv.weight", "autoencoder").shape[1])


# ---------------------------------------------------------------------------------------------------
# configs from an original CompVis yaml

# CompVis UNet params that do not change weights or fp32 numerics, with the values that keep it so.
_UNET_NEUTRAL = {"conv_resample": True, "dims": 2, "num_heads_upsample": -1, "n_embed": None,
                 "disable_self_attentions": None, "num_attention_blocks": None, "disable_middle_self_attn": False}
_UNET_IGNORED = {"image_size", "use_fp16", "use_bf16", "legacy", "use_new_attention_order", "spatial_transformer_attn_type"}
_DDCONFIG_NEUTRAL = {"attn_type": ("vanilla", "vanilla-xformers"), "resamp_with_conv": (True,),
                     "give_pre_end": (False,), "tanh_out": (False,), "use_linear_attn": (False,)}
# CompVis names its schedules after what is linear in *its* code: "linear" is SD's scaled_linear.
_COMPVIS_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}


@dataclass
class OriginalConfig:
    """What an original CompVis yaml says, in our terms (None where the yaml says nothing)."""

    unet: dict[str, Any] | None
    ddconfig: EncoderDecoderConfig | None
    embed_dim: int | None
    scale_factor: float
    schedule: dict[str, Any]  # NoiseSchedule kwargs
    prediction: str
    cond_stage_config: dict[str, Any] | None


def _single(value: Any, name: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ExportError(f"unet_config.params.{name}={list(value)}: per-level values are not supported")
        return value[0]
    return value


def unet_kwargs_from_compvis(params: Mapping[str, Any]) -> dict[str, Any]:
    """``UNetModel`` kwargs for a CompVis ``unet_config.params`` (openaimodel.UNetModel)."""
    params = dict(params)
    bad = [f"{k}={params[k]!r}" for k, v in _UNET_NEUTRAL.items() if k in params and params[k] != v]
    known = {"in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
             "num_heads", "num_head_channels", "transformer_depth", "transformer_depth_middle", "context_dim",
             "use_linear_in_transformer", "use_scale_shift_norm", "resblock_updown", "dropout", "num_classes",
             "adm_in_channels", "use_checkpoint", "use_spatial_transformer"} | set(_UNET_NEUTRAL) | _UNET_IGNORED
    bad += [f"unknown key {k!r}" for k in params if k not in known]
    if not params.get("use_spatial_transformer", False):
        bad.append("use_spatial_transformer=false (our UNet has SpatialTransformers, not ADM AttentionBlocks)")
    depth = _single(params.get("transformer_depth", 1), "transformer_depth")
    if params.get("transformer_depth_middle", depth) != depth:
        bad.append("transformer_depth_middle differs from transformer_depth")
    if bad:
        raise ExportError("unet_config.params cannot be expressed by our UNetModel: " + "; ".join(bad))
    num_classes = params.get("num_classes")
    return {
        "in_channels": int(params["in_channels"]), "out_channels": int(params["out_channels"]),
        "model_channels": int(params["model_channels"]), "channel_mult": [int(m) for m in params["channel_mult"]],
        "num_res_blocks": int(_single(params["num_res_blocks"], "num_res_blocks")),
        "transformer": {
            "attention_resolutions": [int(r) for r in params.get("attention_resolutions", [])],
            "num_heads": params.get("num_heads", -1), "num_head_channels": params.get("num_head_channels", -1),
            "transformer_depth": int(depth), "context_dim": _single(params.get("context_dim"), "context_dim"),
            "use_linear_in_transformer": bool(params.get("use_linear_in_transformer", False)),
        },
        "use_scale_shift_norm": bool(params.get("use_scale_shift_norm", False)),
        "resblock_updown": bool(params.get("resblock_updown", False)), "dropout": float(params.get("dropout", 0.0)),
        "gradient_checkpointing": bool(params.get("use_checkpoint", False)),
        "num_classes": None if num_classes in (None, "sequential") else int(num_classes),
        "adm_in_channels": int(params["adm_in_channels"]) if num_classes == "sequential" else None,
    }


def ddconfig_from_compvis(ddconfig: Mapping[str, Any]) -> EncoderDecoderConfig:
    ours = {f.name for f in fields(EncoderDecoderConfig)}
    bad = [f"{k}={v!r}" for k, v in ddconfig.items() if k not in ours and v not in _DDCONFIG_NEUTRAL.get(k, ())]
    if bad:
        raise ExportError("first_stage_config ddconfig cannot be expressed by our AutoencoderKL: " + "; ".join(bad))
    return EncoderDecoderConfig.from_mapping({k: v for k, v in ddconfig.items() if k in ours})


def schedule_from_compvis(params: Mapping[str, Any]) -> dict[str, Any]:
    """NoiseSchedule kwargs for LatentDiffusion's schedule params (or its ``given_betas``, recognised)."""
    steps = int(params.get("timesteps", 1000))
    if params.get("given_betas") is not None:
        given = torch.tensor(list(params["given_betas"]), dtype=torch.float64)
        for kind in BETA_SCHEDULES:
            for zero_snr in (False, True):
                candidate = NoiseSchedule(kind, len(given), zero_terminal_snr=zero_snr).betas
                if torch.allclose(candidate, given, rtol=1e-6, atol=1e-9):
                    return {"kind": kind, "num_train_timesteps": len(given), "beta_start": None,
                            "beta_end": None, "zero_terminal_snr": zero_snr}
        raise ExportError("given_betas match none of our schedules (with default ranges); set the schedule by hand")
    compvis_kind = params.get("beta_schedule", "linear")
    if compvis_kind not in _COMPVIS_SCHEDULES or not math.isclose(float(params.get("cosine_s", 8e-3)), 8e-3):
        raise ExportError(f"beta_schedule={compvis_kind!r} has no counterpart among ours {BETA_SCHEDULES}")
    kind = _COMPVIS_SCHEDULES[compvis_kind]
    ranged = kind != "cosine"
    return {"kind": kind, "num_train_timesteps": steps, "zero_terminal_snr": False,
            "beta_start": float(params.get("linear_start", 1e-4)) if ranged else None,
            "beta_end": float(params.get("linear_end", 2e-2)) if ranged else None}


def read_original_config(source: str | Path | Mapping[str, Any]) -> OriginalConfig:
    """Our view of an original CompVis/SD yaml (a path, or the loaded mapping)."""
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ExportError(f"original config {source} does not exist")
        source = OmegaConf.load(source)
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    params = dict(source.get("model", {}).get("params", {}))
    if not params:
        raise ExportError("not an original CompVis config: model.params is missing")
    unet = (params.get("unet_config") or {}).get("params")
    first = params.get("first_stage_config") or {}
    if first and not str(first.get("target", "AutoencoderKL")).endswith("AutoencoderKL"):
        raise ExportError(f"first stage {first['target']} is not supported: only AutoencoderKL (KL-regularised)")
    first_params = first.get("params") or {}
    return OriginalConfig(
        unet=unet_kwargs_from_compvis(unet) if unet else None,
        ddconfig=ddconfig_from_compvis(first_params["ddconfig"]) if "ddconfig" in first_params else None,
        embed_dim=int(first_params["embed_dim"]) if "embed_dim" in first_params else None,
        scale_factor=float(params.get("scale_factor", 1.0)),  # 1.0: LatentDiffusion's default
        schedule=schedule_from_compvis(params),
        prediction=str(params.get("parameterization", "eps")),
        cond_stage_config=params.get("cond_stage_config"),
    )


# ---------------------------------------------------------------------------------------------------
# loading


def _original(original_config) -> OriginalConfig | None:
    if original_config is None or isinstance(original_config, OriginalConfig):
        return original_config
    return read_original_config(original_config)


def load_compvis_unet(
    path: str | Path, original_config=None, use_ema: bool = False,
    num_heads: int | None = None, num_head_channels: int | None = None,
) -> tuple[UNetModel, dict[str, Any]]:
    """(frozen UNetModel, its kwargs) from a CompVis single file; ``use_ema`` takes CompVis' flat
    ``model_ema.*`` copy. The config comes from the original yaml if given, else from the shapes."""
    tensors = read_state_dict(path)
    sd = strip_prefix(tensors, UNET_PREFIX)
    if not sd:
        raise ExportError(f"{path} holds no {UNET_PREFIX}* weights (prefixes found: {_prefixes(tensors)})")
    if use_ema:
        flat = {k: "model_ema." + f"diffusion_model.{k}".replace(".", "") for k in sd}
        absent = [v for v in flat.values() if v not in tensors]
        if absent:
            raise ExportError(f"{path} has no complete model_ema.* copy ({len(absent)} missing, e.g. {absent[:3]})")
        sd = {k: tensors[v] for k, v in flat.items()}
    original = _original(original_config)
    kwargs = original.unet if original is not None and original.unet else unet_kwargs_from_state_dict(
        sd, num_heads, num_head_channels)
    unet = UNetModel(**kwargs)
    load_state_strict(unet, sd, f"{path} ({UNET_PREFIX}*)")
    return frozen(unet), kwargs


def _prefixes(tensors: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(".")[0] + "." for k in tensors})[:8]


@dataclass
class PretrainedAutoencoder:
    autoencoder: AutoencoderKL
    scale_factor: float | None  # what the source says (None: it says nothing)
    shift_factor: float | None
    source: str


def load_compvis_autoencoder(path: str | Path, original_config=None) -> PretrainedAutoencoder:
    """A CompVis first stage: a full SD file (``first_stage_model.*``) or an autoencoder-only file
    (bare ``encoder.*``/``decoder.*`` keys; CompVis' ``loss.*`` training modules are dropped)."""
    tensors = read_state_dict(path)
    sd = strip_prefix(tensors, FIRST_STAGE_PREFIX)
    if not sd:
        sd = {k: v for k, v in tensors.items() if not k.startswith("loss.")}
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        raise ExportError(f"{path} uses diffusers' key names: pass its folder (config.json + weights) instead")
    original = _original(original_config)
    if original is not None and original.ddconfig is not None:
        ddconfig, embed_dim = original.ddconfig, original.embed_dim
    else:
        ddconfig, embed_dim = autoencoder_config_from_state_dict(sd)
    autoencoder = AutoencoderKL(ddconfig, embed_dim)
    load_state_strict(autoencoder, sd, f"{path} (first stage)")
    scale = float(tensors["scale_factor"]) if "scale_factor" in tensors else None
    if scale is None and original is not None:
        scale = original.scale_factor
    return PretrainedAutoencoder(frozen(autoencoder), scale, None, str(path))


def load_diffusers_autoencoder(folder: str | Path) -> PretrainedAutoencoder:
    """A diffusers AutoencoderKL folder (config.json + weights), or a pipeline folder with ``vae/``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a diffusers AutoencoderKL folder: config.json is missing")
    config = json.loads((folder / "config.json").read_text())
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise ExportError(f"{folder} holds none of {DIFFUSERS_WEIGHTS}")
    ddconfig, embed_dim = autoencoder_from_diffusers_config(config)
    autoencoder = AutoencoderKL(ddconfig, embed_dim)
    load_state_strict(autoencoder, autoencoder_from_diffusers(read_state_dict(weights), ddconfig), str(weights))
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    return PretrainedAutoencoder(frozen(autoencoder), None if scale is None else float(scale),
                                 None if shift is None else float(shift), str(folder))


def load_pretrained_autoencoder(path: str | Path, original_config=None) -> PretrainedAutoencoder:
    """A diffusers folder or a CompVis single file, whichever ``path`` is."""
    return load_diffusers_autoencoder(path) if Path(path).is_dir() else load_compvis_autoencoder(path, original_config)


def autoencoder_config_node(autoencoder: AutoencoderKL) -> dict[str, Any]:
    """The Hydra node that rebuilds ``autoencoder`` (for the config of exports made on a pretrained one)."""
    ddconfig = asdict(autoencoder.config)
    ddconfig.update(ch_mult=list(ddconfig["ch_mult"]), attn_resolutions=list(ddconfig["attn_resolutions"]))
    return {"_target_": "ldm.nets.autoencoder.AutoencoderKL", "ddconfig": ddconfig, "embed_dim": autoencoder.embed_dim}

"""Pretrained models stage 2 can start from (issue 18), read without Lightning and without unpickling.

Four formats, one reader each:

* ``compvis``: a CompVis / Stable Diffusion single file (``.safetensors``; ``.ckpt``/``.pt`` only through
  ``torch.load(weights_only=True)``): ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
  ``cond_stage_model.transformer.*`` (Hugging Face CLIP text model, SD-1.x), schedule buffers (``betas``).
* ``diffusers``: a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), a local path or a hub id (``huggingface_hub.snapshot_download``, where a network exists).
* ``export``: a stage-2 export folder of ``ldm-train`` (``model.safetensors`` + ``config.yaml`` + ``meta.json``).
* ``dit``: a facebookresearch/DiT checkpoint (the transformer only; ldm.finetune.official_dit).

A single file's layout is recognised from its keys (``layout_of``), so a file given to the wrong ``init=`` is
named for what it is.

Everything here is cached per (path, modification time): Hydra resolvers call it once per config key.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ldm.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule
from ldm.io.compvis import (
    COND_STAGE_PREFIX,
    SAFETENSORS_SUFFIXES,
    UNET_PREFIX,
    read_original_config,
    read_state_dict,
    strip_prefix,
    unet_kwargs_from_state_dict,
)
from ldm.io.convert import unet_from_diffusers, unet_from_diffusers_config
from ldm.io.export import ExportError, read_export
from ldm.io.load import backbone_config_of

FORMATS = ("compvis", "diffusers", "export", "dit")
SINGLE_FILE_FORMATS = ("compvis", "dit")
# keys every facebookresearch/DiT state dict holds (models.py names; ldm.nets.dit keeps them)
DIT_KEYS = ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "blocks.0.attn.qkv.weight",
            "blocks.0.mlp.fc1.weight", "final_layer.linear.weight")
# diffusers' names for what our schedules and objectives call eps / v / x0 and our schedule kinds.
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
CLIP_PREFIX = COND_STAGE_PREFIX + "transformer."  # SD-1.x: FrozenCLIPEmbedder wraps a transformers CLIPTextModel
OPEN_CLIP_PREFIX = COND_STAGE_PREFIX + "model."  # SD-2.x: OpenCLIP, another layout


class InitError(ExportError):
    """A pretrained source that cannot start this run; the message names the fix."""


def local_path(path: str | os.PathLike | None, fmt: str) -> Path:
    """The source as a local path: a diffusers hub id is downloaded (cached) where a network exists."""
    if fmt not in FORMATS:
        raise InitError(f"init.format={fmt!r} is not one of {FORMATS}")
    if path is None or str(path) in ("", "None", "null", "???"):
        raise InitError(f"init={fmt} needs init.path: {_WHAT[fmt]}")
    local = Path(str(path)).expanduser()
    if local.exists():
        return local
    if fmt == "diffusers" and str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
        except Exception as err:  # offline, unknown repo, gated: all are "cannot get it"
            raise InitError(f"init.path={path} is neither a local folder nor a downloadable hub id ({err})") from err
    raise InitError(f"init.path={path} does not exist: {_WHAT[fmt]}")


_WHAT = {
    "compvis": "a CompVis/SD single file (.safetensors, or .ckpt read with weights_only=True)",
    "diffusers": "a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id",
    "export": "a stage-2 export folder of ldm-train (model.safetensors + config.yaml + meta.json)",
    "dit": "a facebookresearch/DiT checkpoint (DiT-XL-2-256x256.pt, or a train.py checkpoint)",
}


def layout_of(keys) -> str | None:
    """'dit' (facebookresearch/DiT), 'compvis' (model.diffusion_model.*) or None: the layout of a single file."""
    keys = set(keys)
    if all(k in keys for k in DIT_KEYS):
        return "dit"
    return "compvis" if any(k.startswith(UNET_PREFIX) for k in keys) else None


def _stamp(path: Path) -> tuple[str, int]:
    return str(path.resolve()), path.stat().st_mtime_ns


def check_kind(path: Path, fmt: str) -> None:
    if fmt in SINGLE_FILE_FORMATS and path.is_dir():
        hint = "init=export" if (path / "meta.json").is_file() else "init=diffusers"
        raise InitError(f"init.path={path} is a folder, but init={fmt} reads one single file: use {hint}")
    if fmt not in SINGLE_FILE_FORMATS and not path.is_dir():
        raise InitError(f"init.path={path} is a file, but init={fmt} reads a folder: use init=compvis (or init=dit "
                        "for a DiT checkpoint) for a single file")


# ---------------------------------------------------------------------------------------------------
# tensor shapes and tensors


@functools.lru_cache(maxsize=8)
def _shapes(stamp: tuple[str, int]) -> dict[str, tuple[int, ...]]:
    path = Path(stamp[0])
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as f:  # header only: no tensor is read
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise InitError(f"{path} is not a readable safetensors file: {err}") from err
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def compvis_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return _shapes(_stamp(path))


def _meta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def compvis_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)


def diffusers_config(folder: Path, part: str, name: str = "config.json") -> dict[str, Any]:
    file = folder / part / name
    if not file.is_file():
        raise InitError(f"{folder} is not a diffusers pipeline folder: {part}/{name} is missing")
    return json.loads(file.read_text())


def diffusers_weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / part / name).is_file():
            return read_state_dict(folder / part / name)
    raise InitError(f"{folder / part} holds no weights (diffusion_pytorch_model.safetensors)")


# ---------------------------------------------------------------------------------------------------
# the UNet


def unet_kwargs(path: Path, fmt: str, original_config: str | None = None) -> dict[str, Any]:
    """UNetModel kwargs of the source (transformer as a plain mapping)."""
    check_kind(path, fmt)
    if fmt == "export":
        _, config, _ = read_export(path, kind="ldm")
        node = OmegaConf.to_container(backbone_config_of(config), resolve=True)
        if node.get("_target_") != "ldm.nets.unet.UNetModel":
            raise InitError(f"{path}: its backbone is {node.get('_target_')}; init= reads UNetModel backbones")
        return {k: v for k, v in node.items() if k != "_target_"}
    if fmt == "diffusers":
        return unet_from_diffusers_config(diffusers_config(path, "unet"))
    if original_config is not None:
        original = read_original_config(original_config)
        if original.unet:
            return original.unet
    shapes = compvis_shapes(path)
    unet = strip_prefix(_meta(shapes), UNET_PREFIX)
    if not unet and layout_of(shapes) == "dit":
        raise InitError(f"init.path={path} is an official DiT checkpoint (facebookresearch/DiT keys): use init=dit")
    if not unet:
        raise InitError(f"{path} holds no {UNET_PREFIX}* weights: not a CompVis/SD single file")
    return unet_kwargs_from_state_dict(unet)


def unet_state(path: Path, fmt: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(UNet tensors in our CompVis layout, every other key of the source: not part of the UNet)."""
    if fmt == "diffusers":
        state = diffusers_weights(path, "unet")
        return unet_from_diffusers(state, kwargs), []
    tensors = read_export(path, kind="ldm")[0] if fmt == "export" else compvis_tensors(path)
    return strip_prefix(tensors, UNET_PREFIX), sorted(k for k in tensors if not k.startswith(UNET_PREFIX))


# ---------------------------------------------------------------------------------------------------
# schedule and prediction type


def schedule_and_prediction(
    path: Path, fmt: str, original_config: str | None = None, prediction: str | None = None
) -> tuple[dict[str, Any], str]:
    """(NoiseSchedule kwargs, prediction) as the source states them. A single file without its original yaml
    does not state its prediction type (SD-2.x 768 is v, SD-2.x 512 and SD-1.x are eps): then ``prediction``
    must be given; it is never silently assumed."""
    check_kind(path, fmt)
    if fmt == "export":
        _, config, _ = read_export(path, kind="ldm")
        objective = OmegaConf.to_container(config.objective, resolve=True)
        schedule = {k: v for k, v in objective["schedule"].items() if k != "_target_"}
        return schedule, _prediction(prediction, str(objective.get("prediction", "eps")), path)
    if fmt == "diffusers":
        return _diffusers_schedule(path, prediction)
    if original_config is not None:
        original = read_original_config(original_config)
        return original.schedule, _prediction(prediction, original.prediction, path)
    if prediction is None:
        raise InitError(
            f"{path} does not state its prediction type: set init.prediction=eps (SD-1.x, SD-2.x base 512) or "
            "init.prediction=v (SD-2.x 768-v), or pass its original yaml as init.original_config"
        )
    return _schedule_from_betas(path), _prediction(prediction, None, path)


def _prediction(given: str | None, stated: str | None, path: Path) -> str:
    if given is not None and stated is not None and given != stated:
        raise InitError(f"init.prediction={given} but {path} was trained with {stated}: drop init.prediction")
    value = given or stated
    if value not in ("eps", "v", "x0"):
        raise InitError(f"prediction type {value!r} of {path} is not one of eps, v, x0")
    return value


def _diffusers_schedule(path: Path, prediction: str | None) -> tuple[dict[str, Any], str]:
    config = diffusers_config(path, "scheduler", "scheduler_config.json")
    kind = DIFFUSERS_BETA_SCHEDULES.get(config.get("beta_schedule", "linear"))
    if config.get("trained_betas") or kind is None:
        raise InitError(f"{path}/scheduler: beta_schedule={config.get('beta_schedule')!r} / trained_betas have no "
                        f"counterpart among ours {BETA_SCHEDULES}")
    stated = DIFFUSERS_PREDICTIONS.get(config.get("prediction_type", "epsilon"))
    if stated is None:
        raise InitError(f"{path}/scheduler: prediction_type={config['prediction_type']!r} is not one we train")
    ranged = kind != "cosine"
    schedule = {"kind": kind, "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
                "beta_start": float(config.get("beta_start", 1e-4)) if ranged else None,
                "beta_end": float(config.get("beta_end", 2e-2)) if ranged else None,
                "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False))}
    return schedule, _prediction(prediction, stated, path)


def _schedule_from_betas(path: Path) -> dict[str, Any]:
    """SD single files carry their betas (a LatentDiffusion buffer): recognise them among our schedules."""
    tensors = compvis_tensors(path)
    if "betas" not in tensors:
        raise InitError(f"{path} holds no 'betas' buffer and no yaml was given: pass init.original_config")
    given = tensors["betas"].double()
    # defaults first (SD's 0.00085..0.012 are scaled_linear's), then the file's own end points
    ends = [(None, None), (float(given[0]), float(given[-1]))]
    for kind in ("scaled_linear", "linear", "cosine"):
        for (start, end) in ends[:1] if kind == "cosine" else ends:
            for zero_snr in (False, True):
                candidate = NoiseSchedule(kind, len(given), start, end, zero_terminal_snr=zero_snr).betas
                if torch.allclose(candidate, given, rtol=1e-5, atol=1e-8):
                    return {"kind": kind, "num_train_timesteps": len(given), "beta_start": start, "beta_end": end,
                            "zero_terminal_snr": zero_snr}
    raise InitError(f"the betas of {path} match none of our schedules {BETA_SCHEDULES}: pass init.original_config")


# ---------------------------------------------------------------------------------------------------
# the text encoder


def text_encoder_kind(path: Path, fmt: str) -> str | None:
    """'clip' (Hugging Face layout), 'open_clip' (SD-2.x single files) or None: what the source holds."""
    if fmt == "diffusers":
        return "clip" if (path / "text_encoder" / "config.json").is_file() else None
    if fmt == "export":
        return None
    keys = compvis_shapes(path)
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "clip"
    return "open_clip" if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) else None

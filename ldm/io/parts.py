"""What ``ldm-export`` reads from a stage-2 export folder, in the terms its writers need."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.io.convert.dit import dit_kwargs
from ldm.io.export import ExportError, read_export
from ldm.io.load import backbone_config_of
from ldm.nets.autoencoder import EncoderDecoderConfig

UNET_TARGET = "ldm.nets.unet.UNetModel"
DIT_MODULE = "ldm.nets.dit."  # DiT and its size presets (dit_s_2, ...)
AUTOENCODER_TARGET = "ldm.nets.autoencoder.AutoencoderKL"


def _plain(node: Any) -> Any:
    """A Hydra node without its ``_target_`` keys (recursively)."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items() if k != "_target_"}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node



@dataclass
class LatentDiffusionParts:
    """Everything a stage-2 export holds, in the terms the writers need."""

    tensors: dict[str, torch.Tensor]
    unet: dict[str, Any]  # UNetModel kwargs (transformer as a plain mapping), or DiT kwargs (dit_kwargs)
    ddconfig: EncoderDecoderConfig
    embed_dim: int
    scale_factor: float
    schedule: dict[str, Any]  # NoiseSchedule kwargs
    prediction: str
    conditioner: dict[str, Any]  # the Hydra node
    timestep_spacing: str
    latent_size: int
    dit: bool = False  # the backbone is a DiT (diffusers: DiTTransformer2DModel in a DiTPipeline)


def read_parts(folder: str | Path) -> LatentDiffusionParts:
    tensors, config, _ = read_export(folder, kind="ldm")
    config = OmegaConf.to_container(config, resolve=True)
    config["unet"] = backbone_config_of(config)
    dit = str(config["unet"].get("_target_")).startswith(DIT_MODULE)
    for part, targets in (("unet", (UNET_TARGET,)), ("autoencoder", (AUTOENCODER_TARGET,))):
        if config[part].get("_target_") not in targets and not (part == "unet" and dit):
            raise ExportError(f"{folder}: {part} is {config[part].get('_target_')}, only {targets[0]} (or a "
                              f"{DIT_MODULE} DiT) can be exported")
    autoencoder = _plain(config["autoencoder"])
    ddconfig = EncoderDecoderConfig.from_mapping(autoencoder["ddconfig"])
    objective = config["objective"]
    image_size = (config.get("data") or {}).get("image_size")
    scale = tensors.get("scale_factor", torch.tensor(float(config.get("scale_factor", 1.0))))
    return LatentDiffusionParts(
        tensors=tensors, unet=_dit_kwargs(config["unet"]) if dit else _plain(config["unet"]), ddconfig=ddconfig, embed_dim=int(autoencoder["embed_dim"]),
        scale_factor=float(scale), schedule=_plain(objective["schedule"]), prediction=str(objective.get("prediction", "eps")),
        conditioner=config["conditioner"], timestep_spacing=str((config.get("sampler") or {}).get("timestep_spacing", "leading")),
        latent_size=int(image_size) // 2 ** (len(ddconfig.ch_mult) - 1) if image_size else 64, dit=dit,
    )


def _dit_kwargs(node: dict[str, Any]) -> dict[str, Any]:
    """Every constructor argument of the DiT a node builds (a size preset included), built on the meta device."""
    from hydra.utils import instantiate

    with torch.device("meta"):
        return dit_kwargs(instantiate({k: v for k, v in node.items() if k != "_partial_"}))

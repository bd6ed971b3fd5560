"""Resolving the ``guidance`` config group for sampling: autoguidance's guide model is loaded here (an export
folder or a ``.ckpt``, like the model itself) and checked against the model before any sample is drawn."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.model.guidance import Guidance, GuidanceConfig, as_guidance_config, check_guide


def guidance_config(value: Any) -> GuidanceConfig:
    """A GuidanceConfig from the ``guidance`` node of a config (or one already built, or None = plain CFG)."""
    if isinstance(value, DictConfig):  # a `???` guide stays visible as such, for GuidanceConfig's own error
        value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    return as_guidance_config(value)


def resolve_guidance(config: Any, model: Any, model_name: str, device: str | torch.device | None = None) -> Guidance:
    """``Guidance`` for ``LatentDiffusion.sample`` from a ``guidance`` config (a GuidanceConfig, its config node,
    or None = plain classifier-free guidance). ``model_name`` names the model in a mismatch error."""
    from ldm.io.load import load_ldm

    config = guidance_config(config)
    guide = None
    if config.method == "autoguidance":
        guide, _ = load_ldm(str(config.guide), device if device is not None else model.device, config.guide_use_ema)
        check_guide(model, guide, model_name, str(config.guide))
    return Guidance(interval=config.interval, guide=guide)

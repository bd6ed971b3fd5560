"""Resolving the ``guidance`` config group for sampling: autoguidance's guide model is loaded here (an export
folder or a ``.ckpt``, like the model itself) and checked against the model before any sample is drawn."""

from __future__ import annotations

from pathlib import Path
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


# In an export's `guidance` record a relative guide is the export's own (``<export>/guide``): a moved export
# folder still finds it.
OWN_GUIDE = "guide"


def export_guidance_record(value: Any, export_folder: str | Path) -> dict[str, Any]:
    """The export's ``guidance`` entry: the method, band and guide of the run's final samples (GuidanceConfig's
    fields), which ldm-sample and ldm-evaluate use when no ``guidance=`` is given. The run's own guide is kept
    relative to the export; any other guide as an absolute path (a relative one was relative to the run's cwd)."""
    config = guidance_config(value)
    guide = config.guide
    if guide is not None:
        path = Path(str(guide))
        own = Path(export_folder) / OWN_GUIDE
        guide = OWN_GUIDE if path.resolve() == own.resolve() else str(path.resolve())
    return {**config.describe(), "guide": guide, "guide_use_ema": bool(config.guide_use_ema)}


def model_guidance(info: dict[str, Any], model_path: str | Path) -> GuidanceConfig | None:
    """The guidance a model's own final samples used: its export's ``guidance`` record, or the ``guidance`` of a
    ``.ckpt``'s run config; None for a model that records none (exported before the record: plain CFG)."""
    record = (info.get("config") or {}).get("guidance")
    if record is None:
        return None
    config = guidance_config(dict(record))
    model_path = Path(model_path)
    if config.guide is not None and model_path.is_dir() and not Path(str(config.guide)).is_absolute():
        config.guide = str(model_path / str(config.guide))
    return config

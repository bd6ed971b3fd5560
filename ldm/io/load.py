"""Loading a trained latent diffusion model for sampling: from its export folder or a Lightning checkpoint."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from ldm.config import register_resolvers
from ldm.io.checkpoint_io import restore_frozen_state, tensors_hash, upgrade_checkpoint_keys
from ldm.io.export import ExportError, frozen, load_state_strict, read_export
from ldm.io.sharded_checkpoint import is_sharded_checkpoint, load_weights, read_meta
from ldm.model import FirstStage, LatentDiffusion

# What torch.load raises for a file that is not a weights-only torch checkpoint.
_READ_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError)


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_conditioner(config: Any, tensors: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Rebuild the conditioner; frozen pretrained encoders come from their own weights, learned parts
    (class embeddings) from the export, and every exported tensor must find its place."""
    conditioner = instantiate(config)
    own = conditioner.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    learned = {n for n, p in conditioner.named_parameters() if p.requires_grad}
    missing = sorted(learned - set(tensors))
    if unexpected or missing:
        raise ExportError(f"conditioner weights in {source} do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    conditioner.load_state_dict(tensors, strict=False)
    return frozen(conditioner)


def backbone_config_of(config: Any) -> Any:
    """An export's backbone config: ``backbone``, or ``unet`` in exports written before the model layer."""
    node = config.get("backbone") if "backbone" in config else config.get("unet")
    if node is None:
        raise ExportError("the export's config.yaml has no backbone (nor unet) entry: re-export the run")
    return node


def load_ldm_export(folder: str | Path, device: str | torch.device = "cpu") -> tuple[LatentDiffusion, dict[str, Any]]:
    """(model, info) from a stage-2 export folder; ``info`` holds the config and meta for manifests."""
    register_resolvers()
    tensors, config, meta = read_export(folder, kind="ldm")
    source = str(folder)
    backbone = instantiate(backbone_config_of(config))
    load_state_strict(backbone, _split(tensors, "model.diffusion_model."), source)
    autoencoder = instantiate(config.autoencoder)
    load_state_strict(autoencoder, _split(tensors, "first_stage_model."), source)
    conditioner = load_conditioner(config.conditioner, _split(tensors, "cond_stage_model."), source)
    first_stage = FirstStage(autoencoder, float(tensors["scale_factor"]))
    objective = instantiate(config.objective)
    model = LatentDiffusion(frozen(backbone), conditioner, first_stage, objective).to(device)
    info = {"config": OmegaConf.to_container(config), "meta": meta, "source": source}
    return model, info


def load_ldm_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """(model, info) from a Lightning ``.ckpt`` of a stage-2 run (a file, or trainer=fsdp's distributed checkpoint
    folder), rebuilt from the run's config.yaml.

    Loaded with ``weights_only=True``: a checkpoint is never unpickled.
    """
    register_resolvers()
    path = Path(path)
    if is_sharded_checkpoint(path):  # trainer=fsdp's distributed checkpoint folder: its weights, gathered here
        return _load_ldm_checkpoint(path, {**read_meta(path), "state_dict": load_weights(path)}, device, use_ema)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    # Read first: a pickled, truncated or foreign file is the likelier mistake than a missing config.yaml,
    # and torch's own errors for it (UnpicklingError, RuntimeError) would escape the CLI as a traceback.
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except _READ_ERRORS as err:
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]  # torch's run on for lines
        raise ExportError(f"{path} is not a readable checkpoint ({type(err).__name__}: {reason}): it is truncated, "
                          "corrupt, or pickles objects, which ldm never loads; give an export folder or a "
                          "<run>/checkpoints/*.ckpt written by ldm-train") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ExportError(f"{path} holds no Lightning state_dict: give an export folder or a checkpoint of ldm-train")
    return _load_ldm_checkpoint(path, checkpoint, device, use_ema)


def _load_ldm_checkpoint(path: Path, checkpoint: dict[str, Any], device: str | torch.device, use_ema: bool):
    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ExportError(f"{run_config} is missing: a checkpoint is loaded with the config of the run that wrote it")
    cfg = upgrade_run_config(OmegaConf.load(run_config))
    if cfg.stage.name != "ldm":
        raise ExportError(f"{path} is a checkpoint of stage {cfg.stage.name!r}, not of a latent diffusion model")
    # The model alone (no LightningModule): the checkpoint's `model.*` keys, and the EMA copy's `ema.model.*`
    # in place of the backbone's when use_ema.
    model = instantiate(cfg.stage.module.model)
    upgrade_checkpoint_keys(checkpoint)
    holder = torch.nn.Module()
    holder.model = model
    ema_prefix = ema_conditioner_prefix = None
    if cfg.stage.module.get("ema") is not None:
        # An EMA of a partly frozen backbone (LoRA) shares the frozen weights: they are the backbone's.
        ema_prefix, holder.ema = "ema.model.", torch.nn.Module()
        holder.ema.model = model.backbone
        if any(k.startswith("ema_conditioner.") for k in checkpoint["state_dict"]):  # a text encoder trained
            ema_conditioner_prefix, holder.ema_conditioner = "ema_conditioner.model.", torch.nn.Module()
            holder.ema_conditioner.model = model.conditioner
    state = restore_frozen_state(checkpoint, holder, lambda: tensors_hash(
        model.frozen_state("model.", ema_prefix, ema_conditioner_prefix)))
    load_state_strict(model, _split(state, "model."), str(path))
    ema = _split(state, "ema.model.")
    if use_ema and ema:
        load_state_strict(model.backbone, ema, str(path))
        if ema_conditioner_prefix is not None:  # the averaged text encoder goes with the averaged backbone
            load_state_strict(model.conditioner, _split(state, ema_conditioner_prefix), str(path))
    model.to(device).eval()
    info = {"config": OmegaConf.to_container(cfg, resolve=True), "meta": {"kind": "ldm"}, "source": str(path)}
    return model, info


def load_ldm(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """An export folder or a ``.ckpt`` file."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return load_ldm_checkpoint(path, device, use_ema)
    return load_ldm_export(path, device)


def upgrade_run_config(cfg: Any) -> Any:
    """A run config.yaml written before the model layer (``stage.module.{unet, conditioner, first_stage,
    objective}``) in today's layout (``stage.module.model``), so its checkpoints still load."""
    module = cfg.stage.get("module") if "stage" in cfg else None
    if module is None or "unet" not in module:
        return cfg
    moved = {"ldm.lit.first_stage.FirstStage.from_export": "ldm.io.first_stage.from_export",
             "ldm.lit.pretrained_first_stage.pretrained_first_stage": "ldm.io.first_stage.pretrained_first_stage"}
    first_stage = module.get("first_stage")
    if first_stage is not None and first_stage.get("_target_") in moved:
        first_stage["_target_"] = moved[first_stage["_target_"]]
    with open_dict(cfg):
        parts = {key: module.pop(key) for key in ("unet", "conditioner", "first_stage", "objective")}
        module.model = {"_target_": "ldm.model.LatentDiffusion", "backbone": parts["unet"],
                        **{key: parts[key] for key in ("conditioner", "first_stage", "objective")}}
    return cfg

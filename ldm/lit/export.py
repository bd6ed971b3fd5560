"""Callbacks that write the export folder (safetensors + config) at the end of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.io.compvis import autoencoder_config_node
from ldm.io.export import read_export, save_export
from ldm.io.guide import export_guidance_record
from ldm.lit.finetune import lora_export


@torch.no_grad()
def latent_statistics(autoencoder: torch.nn.Module, dataloader, max_batches: int = 20) -> dict[str, Any]:
    """Mean and std of posterior samples over the first ``max_batches`` training batches.

    1/std is the scale factor stage 2 uses by default (scale_by_std, Rombach et al. 2022 sec. 4.3.2),
    so measured here once, on the data the autoencoder was trained on, with posterior noise included.
    """
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    total = total_sq = None
    count = 0
    for i, batch in enumerate(dataloader):
        if i >= max_batches:
            break
        z = autoencoder.encode(batch["image"].to(device)).sample().double()  # (B, C, h, w)
        per_channel = z.transpose(0, 1).flatten(1)  # (C, B*h*w)
        s, sq = per_channel.sum(1), (per_channel**2).sum(1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += per_channel.shape[1]
    autoencoder.train(was_training)
    if count == 0:
        raise ValueError("cannot measure latent statistics: the training dataloader is empty")
    mean_c = total / count
    var_c = total_sq / count - mean_c**2
    mean = total.sum() / (count * len(total))
    var = total_sq.sum() / (count * len(total)) - mean**2
    return {
        "latent_mean": float(mean),
        "latent_std": float(var.clamp_min(0).sqrt()),
        "latent_mean_per_channel": mean_c.tolist(),
        "latent_std_per_channel": var_c.clamp_min(0).sqrt().tolist(),
        "latent_stats_count": int(count),
    }


class AutoencoderExport(pl.Callback):
    """Writes ``<run>/export``: the autoencoder weights (CompVis first-stage key layout), its config and
    latent statistics, so stage 2 and the sampling CLI load it without Lightning."""

    def __init__(self, folder: str | Path, autoencoder_config: dict) -> None:
        self.folder = Path(folder)
        self.autoencoder_config = autoencoder_config

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        autoencoder = pl_module.autoencoder
        stats = latent_statistics(autoencoder, trainer.datamodule.train_dataloader())
        meta = {
            "kind": "autoencoder",
            "latent_channels": int(autoencoder.embed_dim),
            "downsample_factor": int(autoencoder.downsample_factor),
            "global_step": int(trainer.global_step),
            **stats,
        }
        save_export(self.folder, autoencoder.state_dict(), {"autoencoder": self.autoencoder_config}, meta)
        print(f"autoencoder export: {self.folder}", flush=True)


class LatentDiffusionExport(pl.Callback):
    """Writes ``<run>/export``: one safetensors file in the CompVis single-file layout
    (``model.diffusion_model.*`` = EMA UNet, ``cond_stage_model.*``, ``first_stage_model.*``,
    ``scale_factor``) and a config that rebuilds every part."""

    def __init__(self, folder: str | Path, cfg: DictConfig) -> None:
        self.folder = Path(folder)
        self.cfg = cfg

    def first_stage_config(self, autoencoder: torch.nn.Module) -> dict[str, Any]:
        """The stage-1 export's own config (any autoencoder type), or one derived from a pretrained KL model."""
        path = self.cfg.first_stage.get("path")
        if path is not None and (Path(str(path)) / "meta.json").is_file():
            # a stage-1 export, or the stage-2 export an init=export run started from: both hold `autoencoder`
            _, config, _ = read_export(path)
            return OmegaConf.to_container(config.autoencoder, resolve=True)
        return autoencoder_config_node(autoencoder)

    def export_config(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "backbone": backbone_config(OmegaConf.to_container(cfg.model.ldm.backbone, resolve=True),
                                        pl_module.model.backbone_kwargs),
            "conditioner": OmegaConf.to_container(cfg.cond.conditioner, resolve=True),
            "objective": OmegaConf.to_container(cfg.objective, resolve=True),
            "autoencoder": self.first_stage_config(pl_module.model.first_stage.autoencoder),
            "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
            "scale_factor": float(pl_module.model.first_stage.scale_factor),
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            # The scale the run's final samples used: ldm-sample and ldm-evaluate default to it.
            "guidance_scale": OmegaConf.select(cfg, "stage.final_samples.guidance_scale"),
            # and the method, band and guide (conf/guidance): ldm-sample and ldm-evaluate default to them too
            "guidance": export_guidance_record(cfg.get("guidance"), self.folder),
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank. Under FSDP the shards stay sharded and save_export gathers one tensor at a time as rank 0
        # writes it (never the whole state on one rank), except where finetune=lora merges adapters: gathered.
        lora = OmegaConf.select(self.cfg, "finetune.mode") == "lora"
        tensors = pl_module.export_tensors(gather=lora)
        zero = trainer.is_global_zero
        if zero:
            # finetune=lora: the merged model is the export, the adapters go to <export>/lora (ldm.lit.finetune)
            tensors = lora_export(self.cfg, pl_module, tensors, self.folder)
        elif lora:
            return  # gathered on rank 0 already: nothing left to take part in
        meta = {
            "kind": "ldm",
            "latent_channels": int(pl_module.model.first_stage.latent_channels),
            "global_step": int(trainer.global_step),
            "first_stage_export": str(self.cfg.first_stage.path),
        }
        save_export(self.folder, tensors, self.export_config(pl_module) if zero else {}, meta, write=zero)
        if zero:
            print(f"latent diffusion export: {self.folder}", flush=True)


def backbone_config(node: dict[str, Any], wired: dict[str, Any]) -> dict[str, Any]:
    """The export's backbone config: the configured factory plus what the model wired into it from its
    conditioning, so the export rebuilds the backbone alone. A UNet keeps its cross-attention width in its
    TransformerSpec, as CompVis configs (and ldm-export's conversions) expect."""
    config = {k: v for k, v in node.items() if k != "_partial_"} | wired
    transformer = config.get("transformer")
    if isinstance(transformer, dict) and "context_dim" in config:
        config["transformer"] = {**transformer, "context_dim": config.pop("context_dim")}
    return config

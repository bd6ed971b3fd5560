"""Lightning side of fine-tuning (issue 18): the base reference in checkpoints and the LoRA split of exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.finetune.adapters import split_lora_export, write_adapter


class BaseReference(pl.Callback):
    """Records in every checkpoint what its omitted frozen weights come from (the init source, the finetune
    mode); the weights themselves are rebuilt from the run's config and checked against the fingerprint."""

    def __init__(self, reference: dict[str, Any]) -> None:
        self.reference = reference

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["finetune_base"] = dict(self.reference)


def _scale(cfg: DictConfig, key: str) -> float | None:
    spec = OmegaConf.select(cfg, key)
    return None if spec is None else float(spec.alpha) / int(spec.rank)


def lora_export(cfg: DictConfig, pl_module: pl.LightningModule, tensors: dict[str, torch.Tensor],
                folder: Path) -> dict[str, torch.Tensor]:
    """For a finetune=lora run: the export tensors with the adapters merged, the adapters written to
    ``<export>/lora``. Other runs' tensors pass unchanged."""
    if OmegaConf.select(cfg, "finetune.mode") != "lora":
        return tensors
    text = bool(OmegaConf.select(cfg, "finetune.train_text_encoder"))
    unet_scale, text_scale = _scale(cfg, "finetune.lora"), _scale(cfg, "finetune.text_encoder") if text else None
    # Every tensor comes from export_tensors, which all ranks called (it gathers FSDP shards): nothing here
    # communicates, so rank 0 alone may run it.
    merged, adapters = split_lora_export(tensors, unet_scale, text_scale)
    averaged = pl_module.ema is not None
    info = {"unet_scale": unet_scale, "text_encoder_scale": text_scale,
            "unet": OmegaConf.to_container(cfg.finetune.lora, resolve=True),
            "text_encoder": OmegaConf.to_container(cfg.finetune.text_encoder, resolve=True) if text else None,
            "base": OmegaConf.to_container(cfg.init, resolve=True) if cfg.get("init") is not None else None,
            # which adapters are EMA averages (the text encoder's are whenever the UNet's are and it trains)
            "ema": {"unet": averaged, "text_encoder": averaged and text}}
    write_adapter(folder, adapters, info)
    return merged

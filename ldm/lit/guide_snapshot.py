"""A guide model for free: the run's EMA weights at an early step, exported beside the final ones.

Autoguidance (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version of itself") guides a
model with a weaker one of the same family; an earlier snapshot of the same training run is one (their
ImageNet-512 guides were trained for 1/16 to 1/3.5 of the main model's images). ``stage.keep_guide_at_step=N``
keeps the sampling weights (EMA backbone + learned conditioning) of optimizer step N and writes them as a
stage-2 export at ``<run>/export/guide``, ready for ``guidance=autoguidance guidance.guide=<run>/export/guide``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from ldm.errors import ConfigError
from ldm.io.export import save_export
from ldm.lit.export import LatentDiffusionExport

# Taken from the live model when the guide is written: frozen, so the same at every step.
_FROZEN_PREFIXES = ("first_stage_model.", "scale_factor")


class GuideSnapshot(pl.Callback):
    """Keeps the export tensors of optimizer step ``at_step`` (on the CPU, in the checkpoint, so a resumed run
    keeps them) and writes them as ``<export>/guide`` when training ends."""

    def __init__(self, at_step: int, export: LatentDiffusionExport) -> None:
        if at_step < 1:
            raise ConfigError(f"stage.keep_guide_at_step={at_step} must be a positive optimizer step (or null)")
        self.at_step = int(at_step)
        self.export = export
        self.folder = export.folder / "guide"
        self.tensors: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if 0 < trainer.max_steps <= self.at_step:
            raise ConfigError(f"stage.keep_guide_at_step={self.at_step} is not before the run's last step "
                              f"(stage.max_steps={trainer.max_steps}): keep an earlier step, e.g. a fifth of it")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.tensors is not None or trainer.global_step != self.at_step:
            return
        tensors = pl_module.export_tensors()  # every rank: under FSDP this gathers the shards into rank 0
        # Rank 0 alone writes the guide, so it alone keeps it (host memory, one model's worth); the other ranks
        # keep an empty record that the step was taken.
        self.tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()
                        if not k.startswith(_FROZEN_PREFIXES)} if trainer.is_global_zero else {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.tensors is None:
            print(f"no guide export: the run ended at step {trainer.global_step}, before "
                  f"stage.keep_guide_at_step={self.at_step}", flush=True)
            return
        first_stage = pl_module.model.first_stage
        tensors = dict(self.tensors)
        tensors.update({f"first_stage_model.{k}": v for k, v in first_stage.autoencoder.state_dict().items()})
        tensors["scale_factor"] = first_stage.scale_factor.detach().clone()
        meta = {"kind": "ldm", "latent_channels": int(first_stage.latent_channels), "global_step": self.at_step,
                "guide_of": str(self.export.folder), "first_stage_export": str(self.export.cfg.first_stage.path)}
        config = self.export.export_config(pl_module)
        if config["guidance"].get("method") == "autoguidance":  # the guide has no guide of its own: sampled alone,
            config["guidance"] = {**config["guidance"], "method": "cfg", "guide": None}  # it is plain CFG
        save_export(self.folder, tensors, config, meta)
        print(f"guide export (EMA weights of step {self.at_step}, for guidance=autoguidance): {self.folder}",
              flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"at_step": self.at_step, "tensors": self.tensors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("at_step") == self.at_step:
            self.tensors = state_dict.get("tensors")
            # A distributed checkpoint gives every rank rank 0's copy: only rank 0 writes the guide.
            if self.tensors and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                self.tensors = {}

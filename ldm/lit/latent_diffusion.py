"""Stage 2 under Lightning: the optimizer, the EMA, logging, previews and checkpoints around the
Lightning-free model (``ldm.model.LatentDiffusion``: backbone + conditioner + frozen first stage + objective).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.io.checkpoint_io import (
    omit_frozen_state,
    restore_frozen_state,
    tensors_hash,
    upgrade_checkpoint_keys,
)
from ldm.lit import sharding
from ldm.lit.ema import EMA, EMAConfig
from ldm.lit.images import log_image_grid
from ldm.model import LatentDiffusion, sample_sharded

# Training loss is also logged per quarter of the timestep range: where a model is weak shows there.
NUM_LOSS_BUCKETS = 4


@dataclass
class PreviewConfig:
    """Sample grids logged during training: per class (or per prompt) at several guidance scales."""

    every_n_steps: int = 1000
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023, eq. 15-17 (0 = off)
    per_class: int = 8
    prompts: list[str] = field(default_factory=list)
    sampler: dict[str, Any] | None = None
    seed: int = 1234


@dataclass
class SpeedConfig:
    """Speed/memory switches that do not change the maths (gradient checkpointing is a UNet argument).

    compile_unet: ``torch.compile`` the training backbone in place (``nn.Module.compile``, so state-dict keys
        keep the CompVis layout); the EMA copy is never compiled: it runs rarely, at other batch sizes.
    compile_mode: torch.compile mode ("default", "reduce-overhead", "max-autotune").
    channels_last: NHWC memory format for the backbone's convolutions (faster on tensor cores and oneDNN).
    vae_chunk_size: the frozen first stage encodes/decodes at most this many images at a time, which
        bounds its activation memory for large batches; null = the whole batch at once.
    fsdp_units: under FSDP, the backbone submodules (by class name) sharded as one unit each: one all-gather
        of their weights in forward, one reduce-scatter of their gradients in backward; None: the backbone's own
        ``fsdp_units``.
    """

    compile_unet: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    vae_chunk_size: int | None = None
    fsdp_units: tuple[str, ...] | None = None


class LatentDiffusionModule(pl.LightningModule):
    def __init__(
        self,
        model: LatentDiffusion,
        optimizer: Any,
        lr: float,
        lr_scheduler: Any = None,
        ema: EMAConfig | None = None,
        preview: PreviewConfig | None = None,
        speed: SpeedConfig | None = None,
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        self.speed = speed or SpeedConfig()
        if self.speed.channels_last:
            model.backbone.to(memory_format=torch.channels_last)
        if self.speed.vae_chunk_size is not None:
            model.first_stage.chunk_size = int(self.speed.vae_chunk_size)
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr = lr
        self.noise_seed = int(noise_seed)
        # The EMA copy is taken before any compilation, so it stays a plain module.
        self.ema = EMA(model.backbone, ema) if ema is not None else None
        self.preview = preview or PreviewConfig()
        self.image_size: int | None = None
        self._preview_step = -1
        self._frozen_hash: str | None = None
        self._configured = False

    # --- the model a sampler uses ---------------------------------------------------------------
    def sampling_backbone(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model.backbone

    def sampler(self, use_ema: bool = True) -> LatentDiffusion:
        """The model with the EMA backbone (``use_ema``), sharing conditioner and first stage."""
        return self.model.with_backbone(self.sampling_backbone()) if use_ema and self.ema is not None else self.model

    # --- training ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``compile_unet``: compile the training backbone, whole, or per FSDP unit before sharding.

        FSDP (trainer=fsdp / fsdp_sim, Lightning's ModelParallelStrategy): shard the backbone, its EMA copy
        (alike, so the average is taken shard by shard) and the conditioner's learned parts over the
        data-parallel mesh, with the mixed-precision policy of ``trainer.precision``."""
        if self._configured:  # Lightning calls this at every fit/validate/test
            return
        self._configured = True
        compile_mode = self.speed.compile_mode if self.speed.compile_unet else None
        mesh = self.device_mesh
        if mesh is None:
            if compile_mode is not None:
                self.model.backbone.compile(mode=compile_mode)
            return
        if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError("tensor parallelism is not implemented: set trainer.strategy.tensor_parallel_size=1")
        data_parallel = mesh["data_parallel"]
        # This strategy loads a checkpoint into the sharded model before on_load_checkpoint can add the frozen
        # tensors checkpoints omit; ldm-train has checked the checkpoint's keys at start-up (check_resume_checkpoint).
        self.strict_loading = False
        policy = sharding.mixed_precision_policy(self.trainer.precision)
        # null: the blocks the backbone declares as its sharding units (ldm.nets.backbone)
        units = self.speed.fsdp_units if self.speed.fsdp_units is not None else getattr(self.model.backbone, "fsdp_units", ())
        sharding.shard_module(self.model.backbone, data_parallel, units, policy, compile_mode)
        if self.ema is not None:
            sharding.shard_module(self.ema.model, data_parallel, units, policy)
        # Learned conditioning (class embeddings) must be sharded too: FSDP reduces only its own gradients.
        for embedder in self.model.conditioner.embedders:
            if any(p.requires_grad for p in embedder.parameters()):
                sharding.shard_module(embedder, data_parallel, (), policy)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "image_size", None):
            self.image_size = int(dm.image_size)

    def noise_generator(self, batch_idx: int) -> torch.Generator:
        """The generator of one training micro-batch's timesteps, noise, posterior sample, CFG drops and
        inpainting holes.

        Its seed is a function of (noise_seed, global rank, optimizer step, micro-batch): every rank of a
        data-parallel run draws its own timesteps and noise (with one shared seed, 32 GPUs would see only
        one batch's worth of distinct timesteps per step), the same seed and world size give the same run,
        and a resumed run draws exactly what the straight run drew, with no RNG state to checkpoint.
        """
        key = f"{self.noise_seed}:{self.global_rank}:{self.global_step}:{batch_idx}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        per_sample, t = self.model.loss(batch, generator=self.noise_generator(batch_idx))
        loss = per_sample.mean()
        batch_size = per_sample.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self._log_loss_buckets(per_sample.detach(), t)
        return loss

    def _log_loss_buckets(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        num_timesteps = self.model.objective.schedule.num_train_timesteps
        bucket = (t.float() * NUM_LOSS_BUCKETS / num_timesteps).long().clamp_(0, NUM_LOSS_BUCKETS - 1)
        for b in range(NUM_LOSS_BUCKETS):
            mask = bucket == b
            if mask.any():
                self.log(f"train/loss_t{b}", per_sample[mask].mean(), batch_size=int(mask.sum()))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Averaged here, once per optimizer step (not per accumulated micro-batch), and before any callback's
        # on_train_batch_end: a checkpoint a callback writes there (ResumeCheckpoint on a requeue signal)
        # must hold this step's average. A step whose gradients were dropped (NonFiniteGuard sets them to
        # None) left the weights alone, so the EMA must not count it either.
        if self.ema is not None and any(p.grad is not None for p in self.model.backbone.parameters()):
            self.ema.update(self.model.backbone)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.preview.every_n_steps
        if every and self.global_step % every == 0 and self.global_step > 0 and self._preview_step != self.global_step:
            self._preview_step = self.global_step  # once per optimizer step under gradient accumulation
            self.log_previews()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The same noise and timesteps at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        per_sample, _ = self.model.loss(batch, generator=generator, backbone=self.sampling_backbone())
        # Synced: the checkpoint monitor must see every rank's share of the validation set, not rank 0's.
        self.log("val/loss", per_sample.mean(), prog_bar=True, batch_size=per_sample.shape[0], sync_dist=True)
        if self.ema is not None:
            generator.manual_seed(10_000 + batch_idx)
            raw, _ = self.model.loss(batch, generator=generator)
            self.log("val/loss_raw", raw.mean(), batch_size=raw.shape[0], sync_dist=True)

    @torch.no_grad()
    def log_previews(self) -> None:
        """Every rank draws a share of the grid (under FSDP each forward is collective); rank 0 logs it."""
        if self.image_size is None:
            return
        sampler = self.sampler()
        conditions = sampler.example_conditions(self.preview.per_class, prompts=self.preview.prompts or None)
        nrow = self.preview.per_class
        for scale in self.preview.guidance_scales:
            images = sample_sharded(sampler, conditions, self.image_size, self.preview.seed,
                                    sampler=self.preview.sampler, guidance_scale=scale,
                                    guidance_rescale=self.preview.guidance_rescale)
            if self.trainer.is_global_zero:
                log_image_grid(self.trainer, f"samples_cfg{scale:g}", images, nrow=nrow)

    # --- checkpoints -------------------------------------------------------------------------------
    def frozen_state(self) -> dict[str, torch.Tensor]:
        """State of the parts that never train: the first stage and frozen conditioner encoders. Rebuilt from
        their source on resume instead of stored in every checkpoint (about 1 GB at SD-1.5 size)."""
        return self.model.frozen_state(prefix="model.", ema_prefix="ema.model." if self.ema is not None else None)

    def frozen_fingerprint(self) -> str:
        if self._frozen_hash is None:  # frozen: hashed once per run
            self._frozen_hash = tensors_hash(self.frozen_state())
        return self._frozen_hash

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        omit_frozen_state(checkpoint, self.frozen_state(), self.frozen_fingerprint())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint_keys(checkpoint)
        checkpoint["state_dict"] = restore_frozen_state(checkpoint, self, self.frozen_fingerprint)

    # --- optimisation ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        # The conditioner's learned parts (class embeddings) train with the backbone; frozen encoders don't, nor
        # (finetune=lora / a freeze list) the frozen backbone weights.
        params = [p for p in self.model.backbone.parameters() if p.requires_grad] + [
            p for p in self.model.conditioner.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters(), lr=self.lr)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- export -------------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """CompVis single-file layout: the EMA backbone is the model (as SD checkpoints ship it). Collective
        under FSDP (the shards are gathered one tensor at a time): every rank must call it; only rank 0's
        result is complete."""
        model = self.model
        backbone = sharding.full_state_dict(self.sampling_backbone(), only_rank0=True)
        tensors = {f"model.diffusion_model.{k}": v for k, v in backbone.items()}
        # Frozen pretrained encoders are referenced by their config, not copied: only learned parts ship.
        learned = {n for n, p in model.conditioner.named_parameters() if p.requires_grad}
        conditioner = sharding.full_state_dict(model.conditioner, only_rank0=True)
        tensors.update({f"cond_stage_model.{k}": v for k, v in conditioner.items() if k in learned})
        tensors.update({f"first_stage_model.{k}": v for k, v in model.first_stage.autoencoder.state_dict().items()})
        tensors["scale_factor"] = model.first_stage.scale_factor.detach().clone()
        return tensors


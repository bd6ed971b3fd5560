"""Stage 2: DDPM in the latent space of a frozen autoencoder (Rombach et al. 2022, sec. 3.2-3.3).

The LightningModule only wires parts that each live elsewhere: the UNet (ldm.nets.unet), the
conditioner (ldm.nets.conditioners), the frozen first stage (ldm.lit.first_stage), the diffusion
objective and samplers (ldm.diffusion), and the EMA (ldm.lit.ema).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ldm.config import ConfigError
from ldm.diffusion.objective import DiffusionObjective
from ldm.finetune.wiring import frozen_backbone_state  # finetune (issue 18)
from ldm.io.checkpoint_io import omit_frozen_state, restore_frozen_state, tensors_hash
from ldm.lit import sharding
from ldm.lit.ema import EMA, EMAConfig
from ldm.lit.first_stage import FirstStage
from ldm.lit.images import log_image_grid
from ldm.lit.inpainting import INPAINT_KEY, inpaint_condition, random_box_masks
from ldm.sampling import LatentSampler, sample_sharded

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

    compile_unet: ``torch.compile`` the training UNet in place (``nn.Module.compile``, so state-dict keys
        keep the CompVis layout); the EMA copy is never compiled: it runs rarely, at other batch sizes.
    compile_mode: torch.compile mode ("default", "reduce-overhead", "max-autotune").
    channels_last: NHWC memory format for the UNet's convolutions (faster on tensor cores and oneDNN).
    vae_chunk_size: the frozen first stage encodes/decodes at most this many images at a time, which
        bounds its activation memory for large batches; null = the whole batch at once.
    fsdp_units: under FSDP, the UNet submodules (by class name) sharded as one unit each: one all-gather
        of their weights in forward, one reduce-scatter of their gradients in backward.
    """

    compile_unet: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    vae_chunk_size: int | None = None
    fsdp_units: tuple[str, ...] = ("ResBlock", "SpatialTransformer", "DiTBlock")


def check_compatibility(unet: nn.Module, conditioner: nn.Module, first_stage: FirstStage) -> None:
    """Fail at start-up, naming both values, when the parts cannot work together."""
    latent = first_stage.latent_channels
    if unet.out_channels != latent:
        raise ConfigError(
            f"UNet out_channels={unet.out_channels} but the first stage has {latent} latent channels: "
            f"set model.ldm.unet.out_channels={latent}"
        )
    try:
        conditioner.check_unet(unet, latent)
    except ValueError as err:
        raise ConfigError(f"{err} Fix model.ldm.unet (or pick a matching cond=).") from err


class LatentDiffusionModule(pl.LightningModule):
    def __init__(
        self,
        unet: nn.Module,
        conditioner: nn.Module,
        first_stage: FirstStage,
        objective: DiffusionObjective,
        optimizer: Any,
        lr: float,
        lr_scheduler: Any = None,
        ema: EMAConfig | None = None,
        preview: PreviewConfig | None = None,
        speed: SpeedConfig | None = None,
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        check_compatibility(unet, conditioner, first_stage)
        self.speed = speed or SpeedConfig()
        if self.speed.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        if self.speed.vae_chunk_size is not None:
            first_stage.chunk_size = int(self.speed.vae_chunk_size)
        self.unet = unet
        self.conditioner = conditioner
        self.first_stage = first_stage
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr = lr
        self.noise_seed = int(noise_seed)
        # The EMA copy is taken before any compilation, so it stays a plain module.
        self.ema = EMA(unet, ema) if ema is not None else None
        self.preview = preview or PreviewConfig()
        self.image_size: int | None = None
        self._preview_step = -1
        self._frozen_hash: str | None = None
        if self.speed.compile_unet:
            self.unet.compile(mode=self.speed.compile_mode)

    # --- the parts a sampler needs ------------------------------------------------------------
    def sampling_unet(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.unet

    def sampler(self, use_ema: bool = True) -> LatentSampler:
        return LatentSampler(
            unet=self.sampling_unet() if use_ema else self.unet,
            conditioner=self.conditioner,
            first_stage=self.first_stage,
            objective=self.objective,
        )

    # --- training ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP (trainer=fsdp / fsdp_sim, Lightning's ModelParallelStrategy): shard the UNet, its EMA copy
        (alike, so the average is taken shard by shard) and the conditioner's learned parts over the
        data-parallel mesh. Nothing to do under other strategies."""
        mesh = self.device_mesh
        if mesh is None or sharding.is_sharded(self.unet):
            return
        if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError("tensor parallelism is not implemented: set trainer.strategy.tensor_parallel_size=1")
        data_parallel = mesh["data_parallel"]
        # This strategy loads a checkpoint into the sharded model before on_load_checkpoint can add the frozen
        # tensors checkpoints omit; ldm-train has checked the checkpoint's keys at start-up (check_resume_checkpoint).
        self.strict_loading = False
        units = self.speed.fsdp_units
        sharding.shard_module(self.unet, data_parallel, units)
        if self.ema is not None:
            sharding.shard_module(self.ema.model, data_parallel, units)
        # Learned conditioning (class embeddings) must be sharded too: FSDP reduces only its own gradients.
        for embedder in getattr(self.conditioner, "embedders", [self.conditioner]):
            if any(p.requires_grad for p in embedder.parameters()):
                sharding.shard_module(embedder, data_parallel, ())

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "image_size", None):
            self.image_size = int(dm.image_size)

    def latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z0 (B, C, h, w): from the latent cache when the batch carries one."""
        if "latent_mean" in batch:
            return self.first_stage.scale(batch["latent_mean"], batch["latent_std"], generator=generator)
        return self.first_stage.encode(batch["image"], generator=generator)

    def with_inpaint_condition(self, batch: dict[str, Any], generator=None) -> dict[str, Any]:
        """Inpainting models train on random holes in each image (cond=inpaint reads INPAINT_KEY)."""
        if INPAINT_KEY not in self.conditioner.input_keys or INPAINT_KEY in batch:
            return batch
        if "image" not in batch:
            raise ConfigError("cond=inpaint needs images to mask: turn stage.latent_cache off")
        images = batch["image"]
        holes = random_box_masks(images.shape[0], images.shape[-1], generator).to(images.device)
        return {**batch, INPAINT_KEY: inpaint_condition(self.first_stage, images, holes)}

    def diffusion_loss(self, unet: nn.Module, batch: dict[str, Any], generator=None):
        batch = self.with_inpaint_condition(batch, generator)
        z0 = self.latents(batch, generator)
        cond = self.conditioner(batch)
        per_sample, t = self.objective.loss(LatentSampler.model_fn(unet), z0, cond, generator=generator)
        return per_sample, t

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
        per_sample, t = self.diffusion_loss(self.unet, batch, generator=self.noise_generator(batch_idx))
        loss = per_sample.mean()
        batch_size = per_sample.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self._log_loss_buckets(per_sample.detach(), t)
        return loss

    def _log_loss_buckets(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        num_timesteps = self.objective.schedule.num_train_timesteps
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
        if self.ema is not None and any(p.grad is not None for p in self.unet.parameters()):
            self.ema.update(self.unet)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.preview.every_n_steps
        if every and self.global_step % every == 0 and self.global_step > 0 and self._preview_step != self.global_step:
            self._preview_step = self.global_step  # once per optimizer step under gradient accumulation
            self.log_previews()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The same noise and timesteps at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        per_sample, _ = self.diffusion_loss(self.sampling_unet(), batch, generator=generator)
        # Synced: the checkpoint monitor must see every rank's share of the validation set, not rank 0's.
        self.log("val/loss", per_sample.mean(), prog_bar=True, batch_size=per_sample.shape[0], sync_dist=True)
        if self.ema is not None:
            generator.manual_seed(10_000 + batch_idx)
            raw, _ = self.diffusion_loss(self.unet, batch, generator=generator)
            self.log("val/loss_raw", raw.mean(), batch_size=raw.shape[0], sync_dist=True)

    @torch.no_grad()
    def log_previews(self) -> None:
        """Every rank draws a share of the grid (under FSDP each forward is collective); rank 0 logs it."""
        if self.image_size is None:
            return
        sampler = self.sampler()
        conditions, nrow = sampler.preview_conditions(self.preview.per_class, self.preview.prompts)
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
        trainable = {f"conditioner.{n}" for n, p in self.conditioner.named_parameters() if p.requires_grad}
        own = self.state_dict()
        frozen = {k: v for k, v in own.items()
                  if k.startswith("first_stage.") or (k.startswith("conditioner.") and k not in trainable)}
        # >>> finetune (issue 18): a LoRA base / freeze list's frozen backbone weights come from init, not checkpoints
        frozen.update(frozen_backbone_state(own, self.unet))
        # <<< finetune
        return frozen

    def frozen_fingerprint(self) -> str:
        if self._frozen_hash is None:  # frozen: hashed once per run
            self._frozen_hash = tensors_hash(self.frozen_state())
        return self._frozen_hash

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        omit_frozen_state(checkpoint, self.frozen_state(), self.frozen_fingerprint())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = restore_frozen_state(checkpoint, self, self.frozen_fingerprint)

    # --- optimisation ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        # The conditioner's learned parts (class embeddings) train with the UNet; frozen encoders don't.
        # finetune (issue 18): only the backbone parameters that train (LoRA adapters, the freeze list's rest)
        params = [p for p in self.unet.parameters() if p.requires_grad] + [
            p for p in self.conditioner.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters(), lr=self.lr)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- export -------------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """CompVis single-file layout: the EMA UNet is the model (as SD checkpoints ship it). Collective
        under FSDP (the shards are gathered): every rank must call it."""
        tensors = {f"model.diffusion_model.{k}": v for k, v in sharding.full_state_dict(self.sampling_unet()).items()}
        # Frozen pretrained encoders are referenced by their config, not copied: only learned parts ship.
        learned = {n for n, p in self.conditioner.named_parameters() if p.requires_grad}
        conditioner = sharding.full_state_dict(self.conditioner)
        tensors.update({f"cond_stage_model.{k}": v for k, v in conditioner.items() if k in learned})
        tensors.update({f"first_stage_model.{k}": v for k, v in self.first_stage.autoencoder.state_dict().items()})
        tensors["scale_factor"] = self.first_stage.scale_factor.detach().clone()
        return tensors

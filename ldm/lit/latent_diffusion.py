"""Stage 2 under Lightning: the optimizer, the EMA, logging, previews and checkpoints around the
Lightning-free model (``ldm.model.LatentDiffusion``: backbone + conditioner + frozen first stage + objective).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field, replace
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
from ldm.lit import meta_init, sharding
from ldm.lit.ema import EMA, EMAConfig
from ldm.lit.images import draw_preview, preview_conditions
from ldm.model import LatentDiffusion
from ldm.model.latent_diffusion import sampling_autocast

log = logging.getLogger(__name__)

# Training loss is also logged per quarter of the timestep range: where a model is weak shows there.
NUM_LOSS_BUCKETS = 4


@dataclass
class PreviewConfig:
    """Sample grids logged during training: per class (or per prompt) at several guidance scales."""

    every_n_steps: int = 1000
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023, eq. 15-17 (0 = off)
    guidance: Any = None  # the method (ldm.model.guidance.GuidanceConfig; None = classifier-free guidance)
    per_class: int = 8
    prompts: list[str] = field(default_factory=list)
    # Without prompts, a text model (no classes) previews this many captions of the validation data, seeded.
    data_prompts: int = 4
    sampler: dict[str, Any] | None = None
    seed: int = 1234
    max_images: int = 64  # per grid: a fixed, seeded subset of the classes/prompts when they are more
    batch_size: int = 16  # images per sampling batch (the ranks share the batches)


@dataclass
class SpeedConfig:
    """Speed/memory switches that do not change the maths (gradient checkpointing is a UNet argument).

    compile_unet: ``torch.compile`` the training backbone in place (``nn.Module.compile``, so state-dict keys
        keep the CompVis layout); the EMA copy is never compiled: it runs rarely, at other batch sizes.
    compile_mode: torch.compile mode ("default", "reduce-overhead", "max-autotune").
    channels_last: NHWC memory format for the backbone's convolutions (faster on tensor cores and oneDNN).
    vae_chunk_size: the frozen first stage encodes/decodes at most this many images at a time, which
        bounds its activation memory for large batches; null = automatic (as many as 4 Mpx: 16 images at 512 px).
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
        # A text encoder that trains (LoRA adapters) is averaged too: the EMA UNet learned against the moving
        # encoder, so validation, previews and exports pair it with the encoder's average, never the live one.
        # Built whole (copy_on_meta concerns the backbone's copy): under FSDP only its trained embedders are sharded.
        self.ema_conditioner = (EMA(model.conditioner, replace(ema, copy_on_meta=False))
                                if ema is not None and text_encoder_trains(model) else None)
        self.preview = preview or PreviewConfig()
        self.image_size: int | None = None
        self._preview_step = -1
        self._guidance = None  # the preview's resolved guidance (ldm.io.guide), at setup
        self._preview_prompts: list[str] | None = None
        self._frozen_hash: str | None = None
        self._bucket_stats: torch.Tensor | None = None  # (2, buckets): loss sums and counts since the last log
        self._configured = False
        self.initial_weights_from: str | None = None  # FSDP: where the backbone's shards got their values

    # --- the model a sampler uses ---------------------------------------------------------------
    def sampling_backbone(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model.backbone

    def sampling_conditioner(self) -> nn.Module:
        return self.ema_conditioner.model if self.ema_conditioner is not None else self.model.conditioner

    def sampler(self, use_ema: bool = True) -> LatentDiffusion:
        """The model with the EMA backbone (``use_ema``) and the EMA conditioner where its text encoder trains,
        sharing the first stage."""
        if not use_ema or self.ema is None:
            return self.model
        return self.model.with_backbone(self.sampling_backbone(), self.sampling_conditioner())

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
        # Rank 0 built the backbone for real, the other ranks on the meta device (ldm.lit.meta_init): each
        # allocates its shards only, filled from rank 0's weights; the EMA copy from the live shards.
        device = self.trainer.strategy.root_device
        from_rank0 = meta_init.shard_from_rank0(self.model.backbone, self.ema.model if self.ema is not None else None,
                                                data_parallel, units, policy, compile_mode, device)
        # A resume built empty (no rank held a full copy): the checkpoint's load is checked at on_train_start.
        self.initial_weights_from = "rank 0" if from_rank0 else "checkpoint"
        # Learned conditioning (class embeddings) must be sharded too: FSDP reduces only its own gradients. Its
        # values are rank 0's as well, its EMA copy's from its shards (averaged shard by shard).
        copies = self.ema_conditioner.model.embedders if self.ema_conditioner is not None else None
        for i, embedder in enumerate(self.model.conditioner.embedders):
            if any(p.requires_grad for p in embedder.parameters()):
                ema = copies[i] if copies is not None else None
                meta_init.shard_from_rank0(embedder, ema, data_parallel, (), policy, None, device)

    def on_train_start(self) -> None:
        if self.initial_weights_from == "checkpoint":  # every shard the checkpoint should have set (ldm.lit.meta_init)
            parts = {"model.backbone": self.model.backbone, **({"ema.model": self.ema.model} if self.ema else {})}
            meta_init.check_filled(parts, self.device, str(self.trainer.ckpt_path))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "image_size", None):
            self.image_size = int(dm.image_size)
        if self._guidance is None and self.preview.every_n_steps:
            from ldm.io.guide import resolve_guidance

            # At start-up, so an autoguidance guide that does not fit fails before any training.
            self._guidance = resolve_guidance(self.preview.guidance, self.model, "of this run", device="cpu")

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
        self._log_loss_buckets(per_sample.detach(), t, batch_idx)
        return loss

    def _log_loss_buckets(self, per_sample: torch.Tensor, t: torch.Tensor, batch_idx: int) -> None:
        """Sums and counts per quarter of the timestep range accumulate on the device (bincount: no sync); every
        ``trainer.log_every_n_steps`` optimizer steps they are summed over ranks and logged as means."""
        num_timesteps = self.model.objective.schedule.num_train_timesteps
        bucket = (t.float() * NUM_LOSS_BUCKETS / num_timesteps).long().clamp_(0, NUM_LOSS_BUCKETS - 1)
        sums = torch.bincount(bucket, weights=per_sample.float(), minlength=NUM_LOSS_BUCKETS)
        counts = torch.bincount(bucket, minlength=NUM_LOSS_BUCKETS).to(sums.dtype)
        stats = torch.stack([sums, counts])  # (2, buckets)
        self._bucket_stats = stats if self._bucket_stats is None else self._bucket_stats + stats
        if not self._is_logging_step(batch_idx):
            return
        stats = self.trainer.strategy.reduce(self._bucket_stats, reduce_op="sum")
        self._bucket_stats = None
        # An empty bucket is NaN (no sample fell there), not a loss of 0.
        means = stats[0] / stats[1].where(stats[1] > 0, torch.nan)
        for b in range(NUM_LOSS_BUCKETS):
            self.log(f"train/loss_t{b}", means[b], batch_size=1)

    def _is_logging_step(self, batch_idx: int) -> bool:
        """The last micro-batch of an optimizer step after which Lightning writes the logs."""
        trainer = self.trainer
        every = max(1, int(trainer.log_every_n_steps))
        last_micro_batch = (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) == 0
        return last_micro_batch and (self.global_step + 1) % every == 0

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Averaged here, once per optimizer step (not per accumulated micro-batch), and before any callback's
        # on_train_batch_end: a checkpoint a callback writes there (ResumeCheckpoint on a requeue signal)
        # must hold this step's average. A step whose gradients were dropped (NonFiniteGuard sets them to
        # None, or flags the optimizer's found_inf on the device) left the weights alone, so the EMA must not
        # count it either.
        if self.ema is not None and any(p.grad is not None for p in self.model.backbone.parameters()):
            optimizer = self.optimizers(use_pl_optimizer=False)
            optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
            skip = getattr(optimizer, "found_inf", None)
            self.ema.update(self.model.backbone, skip=skip)
            if self.ema_conditioner is not None:
                self.ema_conditioner.update(self.model.conditioner, skip=skip)

    def ema_precision(self) -> contextlib.AbstractContextManager:
        """Where the EMA copy evaluates: under ``precision=bf16-true`` (16-bit live weights) the EMA stays fp32
        (``EMA._apply``) and runs under autocast to the live dtype, so it takes the same inputs."""
        live = next(self.model.backbone.parameters()).dtype
        if self.ema is None or live not in (torch.bfloat16, torch.float16):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=live)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.preview.every_n_steps
        if every and self.global_step % every == 0 and self.global_step > 0 and self._preview_step != self.global_step:
            self._preview_step = self.global_step  # once per optimizer step under gradient accumulation
            self.log_previews()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The same noise and timesteps at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        with self.ema_precision():
            per_sample, _ = self.sampler().loss(batch, generator=generator)
        # Synced: the checkpoint monitor must see every rank's share of the validation set, not rank 0's.
        self.log("val/loss", per_sample.mean(), prog_bar=True, batch_size=per_sample.shape[0], sync_dist=True)
        if self.ema is not None:
            generator.manual_seed(10_000 + batch_idx)
            raw, _ = self.model.loss(batch, generator=generator)
            self.log("val/loss_raw", raw.mean(), batch_size=raw.shape[0], sync_dist=True)

    @torch.no_grad()
    def log_previews(self) -> None:
        """Every rank draws a share of the capped grid (under FSDP each forward is collective); rank 0 logs it."""
        if self.image_size is None:
            return
        sampler = self.sampler()
        conditions, nrow = preview_conditions(sampler, replace(self.preview, prompts=self.preview_prompts()))
        autocast = sampling_autocast(self.device, self.trainer.precision)
        guidance = self._guidance.to(self.device) if self._guidance is not None else None
        for scale in self.preview.guidance_scales:
            with self.ema_precision():
                draw_preview(self.trainer, sampler, conditions, self.image_size, f"samples_cfg{scale:g}", nrow,
                             self.preview.seed, self.preview.batch_size, sampler=self.preview.sampler,
                             guidance_scale=scale, guidance_rescale=self.preview.guidance_rescale,
                             autocast_dtype=autocast, guidance=guidance)

    def preview_prompts(self) -> list[str]:
        """The configured prompts; for a text model without classes and none configured, ``data_prompts`` captions
        of the data (seeded, as the SD training scripts' validation prompts): an unconditional grid would show
        nothing of the prompts it learns. Chosen once and logged."""
        if self.preview.prompts:
            return list(self.preview.prompts)
        if self._preview_prompts is None:
            conditioner, dm = self.model.conditioner, getattr(self.trainer, "datamodule", None)
            self._preview_prompts = []
            if conditioner.takes_prompts and not conditioner.num_classes and dm is not None:
                self._preview_prompts = dm.example_captions(self.preview.data_prompts, self.preview.seed)
                log.info("previews draw %d captions of the data (set stage.module.preview.prompts to choose): %s",
                         len(self._preview_prompts), self._preview_prompts)
        return self._preview_prompts

    # --- checkpoints -------------------------------------------------------------------------------
    def frozen_state(self) -> dict[str, torch.Tensor]:
        """State of the parts that never train: the first stage and frozen conditioner encoders. Rebuilt from
        their source on resume instead of stored in every checkpoint (about 1 GB at SD-1.5 size)."""
        return self.model.frozen_state(prefix="model.", ema_prefix="ema.model." if self.ema is not None else None,
                                       ema_conditioner_prefix="ema_conditioner.model."
                                       if self.ema_conditioner is not None else None)

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
    def export_tensors(self, gather: bool = True) -> dict[str, torch.Tensor]:
        """CompVis single-file layout: the EMA backbone is the model (as SD checkpoints ship it). Collective
        under FSDP (the shards are gathered one tensor at a time): every rank must call it; only rank 0's
        result is complete. ``gather=False``: FSDP shards stay DTensors, for ``save_export`` to gather one at a
        time as it writes them."""
        model = self.model

        def state(module: nn.Module) -> dict[str, torch.Tensor]:
            return sharding.full_state_dict(module, only_rank0=True) if gather else dict(module.state_dict())

        backbone = state(self.sampling_backbone())
        tensors = {f"model.diffusion_model.{k}": v for k, v in backbone.items()}
        # Frozen pretrained encoders are referenced by their config, not copied: only embedders that train ship,
        # whole (a LoRA'd text encoder with its base, merged by the LoRA export), averaged where the EMA has them.
        trained = tuple(f"embedders.{i}." for i, e in enumerate(model.conditioner.embedders)
                        if any(p.requires_grad for p in e.parameters()))
        conditioner = state(self.sampling_conditioner())
        tensors.update({f"cond_stage_model.{k}": v for k, v in conditioner.items() if trained and k.startswith(trained)})
        tensors.update({f"first_stage_model.{k}": v for k, v in model.first_stage.autoencoder.state_dict().items()})
        tensors["scale_factor"] = model.first_stage.scale_factor.detach().clone()
        return tensors


def text_encoder_trains(model: LatentDiffusion) -> bool:
    """Whether an embedder that encodes prompts has parameters that train (finetune.train_text_encoder)."""
    return any(getattr(e, "takes_prompts", False) and any(p.requires_grad for p in e.parameters())
               for e in model.conditioner.embedders)

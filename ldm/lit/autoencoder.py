"""Stage 1 training loop: autoencoder + optional PatchGAN with two optimisers (Esser et al. 2021).

Manual optimisation, because the generator and the discriminator step on different losses each batch.
Lightning counts every ``optimizer.step()`` in ``trainer.global_step``, so once the GAN is on one batch
advances ``global_step`` by two; ``disc_start`` and the image-logging cadence therefore count batches
(``self.batches_trained``, saved in checkpoints) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.lit.images import log_image_grid
from ldm.losses.autoencoder import AutoencoderLoss
from ldm.nets.vq import VQModel

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class AutoencoderModule(pl.LightningModule):
    """Trains ``autoencoder`` (AutoencoderKL or VQModel) with ``loss`` (AutoencoderLoss).

    ``optimizer`` is a factory called as ``optimizer(params, lr=lr)`` for the autoencoder and, when the
    loss has a discriminator, again for the discriminator (e.g. Hydra's ``_partial_: true`` AdamW).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        loss: AutoencoderLoss,
        optimizer: OptimizerFactory | None = None,
        lr: float = 4.5e-4,
        image_log_every_n_steps: int = 500,
        num_logged_images: int = 8,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if image_log_every_n_steps < 0 or num_logged_images < 1:
            raise ValueError("image_log_every_n_steps must be >= 0 (0 = off) and num_logged_images >= 1")
        self.automatic_optimization = False
        self.autoencoder = autoencoder
        self.loss = loss
        # Adam(0.5, 0.9) is what CompVis trains its first stages and discriminators with.
        self.optimizer_factory = (
            optimizer if optimizer is not None else partial(torch.optim.Adam, betas=(0.5, 0.9))
        )
        self.lr = float(lr)
        self.image_log_every_n_steps = int(image_log_every_n_steps)
        self.num_logged_images = int(num_logged_images)
        self.is_vq = isinstance(autoencoder, VQModel)
        self.register_buffer("batches_trained", torch.zeros((), dtype=torch.long))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # mean of per-image PSNR
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self._val_images: Tensor | None = None

    def configure_optimizers(self):
        optimizers = [self.optimizer_factory(self.autoencoder.parameters(), lr=self.lr)]
        if self.loss.uses_gan:
            optimizers.append(self.optimizer_factory(self.loss.discriminator.parameters(), lr=self.lr))
        return optimizers

    def _reconstruct(self, images: Tensor, sample_posterior: bool):
        """(reconstruction, posterior or None, codebook loss or None, extra logs)."""
        if self.is_vq:
            reconstructions, codebook_loss, info = self.autoencoder(images)
            extras = {"perplexity": info["perplexity"], "codebook_usage": info["usage"]}
            return reconstructions, None, codebook_loss, extras
        reconstructions, posterior = self.autoencoder(images, sample_posterior=sample_posterior)
        return reconstructions, posterior, None, {}

    def _log_terms(self, prefix: str, logs: dict[str, Tensor], **kwargs) -> None:
        self.log_dict({f"{prefix}/{k}": v.detach().float() for k, v in logs.items()}, **kwargs)

    def _optimizers(self) -> list:
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        step = int(self.batches_trained.item())
        optimizers = self._optimizers()
        ae_optimizer = optimizers[0]
        gan_active = self.loss.gan_active(step)

        # The generator pass must not leave gradients in the discriminator.
        self.toggle_optimizer(ae_optimizer)
        reconstructions, posterior, codebook_loss, extras = self._reconstruct(images, sample_posterior=True)
        ae_loss, logs = self.loss.generator_loss(
            images,
            reconstructions,
            step,
            posterior=posterior,
            codebook_loss=codebook_loss,
            last_layer=self.autoencoder.get_last_layer() if gan_active else None,
        )
        ae_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(ae_loss)
        ae_optimizer.step()
        self.untoggle_optimizer(ae_optimizer)
        logs.update(extras)

        if gan_active:
            disc_optimizer = optimizers[1]
            self.toggle_optimizer(disc_optimizer)
            disc_loss, disc_logs = self.loss.discriminator_loss(images, reconstructions.detach(), step)
            disc_optimizer.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            disc_optimizer.step()
            self.untoggle_optimizer(disc_optimizer)
            logs.update(disc_logs)

        self.log("train/rec_loss", logs.pop("rec_loss"), prog_bar=True)
        self._log_terms("train", logs)
        self.batches_trained += 1
        if self.image_log_every_n_steps and step % self.image_log_every_n_steps == 0:
            self._log_pairs("train/reconstructions", images, reconstructions)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        # The posterior mode is the deterministic reconstruction the metrics are reported for.
        reconstructions, posterior, codebook_loss, extras = self._reconstruct(images, sample_posterior=False)
        logs = {"rec_loss": self.loss.pixel_loss(images, reconstructions)}
        if posterior is not None:
            logs["kl_loss"] = posterior.kl().mean()
        if codebook_loss is not None:
            logs["codebook_loss"] = codebook_loss
        logs.update(extras)
        batch_size = images.shape[0]
        self._log_terms("val", logs, on_epoch=True, batch_size=batch_size, sync_dist=True)
        unit_reconstructions = ((reconstructions.clamp(-1, 1) + 1) / 2).float()
        unit_images = ((images + 1) / 2).float()
        self.val_psnr(unit_reconstructions, unit_images)
        self.val_ssim(unit_reconstructions, unit_images)
        self.log("val/psnr", self.val_psnr, on_epoch=True, batch_size=batch_size, prog_bar=True)
        self.log("val/ssim", self.val_ssim, on_epoch=True, batch_size=batch_size)
        if batch_idx == 0:
            n = self.num_logged_images
            self._val_images = torch.cat([images[:n], reconstructions[:n]]).detach()

    def on_validation_epoch_end(self) -> None:
        if self._val_images is not None and not self.trainer.sanity_checking:
            n = self._val_images.shape[0] // 2
            self._log_grid("val/reconstructions", self._val_images, nrow=n)
        self._val_images = None

    @torch.no_grad()
    def _log_pairs(self, key: str, images: Tensor, reconstructions: Tensor) -> None:
        n = min(self.num_logged_images, images.shape[0])
        self._log_grid(key, torch.cat([images[:n], reconstructions[:n]]), nrow=n)

    def _log_grid(self, key: str, grid: Tensor, nrow: int) -> None:
        log_image_grid(self.trainer, key, grid, nrow=nrow, caption="top: input, bottom: reconstruction")

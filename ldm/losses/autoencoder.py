"""First-stage training objective: reconstruction + regulariser + LPIPS + PatchGAN (Esser et al. 2021).

Every term is a mean over pixels. CompVis's ``LPIPSWithDiscriminator`` sums the reconstruction over
pixels instead; dividing its whole objective by the pixel count gives ours, so ``kl_weight`` (applied
to the KL summed over latent elements, then divided by the pixel count) and ``perceptual_weight`` mean
exactly what they mean in CompVis configs (kl_weight=1e-6, perceptual_weight=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RECONSTRUCTION = ("l1", "l2")
_GAN_LOSSES = ("hinge", "vanilla")


def adaptive_gan_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + eps), clamped to [0, max_weight] (Esser et al. eq. 7).

    L is the decoder's last layer: balancing the two gradients there keeps the adversarial term from
    swamping the reconstruction whatever their raw scales. The result carries no gradient.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    # softplus(-l) = -log sigmoid(l): the non-saturating cross-entropy of Goodfellow et al. 2014
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of a KL or VQ first stage.

    generator: rec + perceptual_weight * LPIPS + kl_weight * KL / pixels + codebook_weight * vq_loss
               + disc_weight * lambda * g_loss   (adversarial part only from step ``disc_start`` on)
    discriminator: hinge or vanilla GAN loss on real vs. reconstructed images.
    """

    def __init__(
        self,
        reconstruction_loss: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        perceptual: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_loss: str = "hinge",
        codebook_weight: float = 1.0,
    ):
        super().__init__()
        if reconstruction_loss not in _RECONSTRUCTION:
            raise ValueError(
                f"reconstruction_loss must be one of {_RECONSTRUCTION}, got {reconstruction_loss!r}"
            )
        if disc_loss not in _GAN_LOSSES:
            raise ValueError(f"disc_loss must be one of {_GAN_LOSSES}, got {disc_loss!r}")
        if min(kl_weight, perceptual_weight, disc_weight, codebook_weight) < 0 or disc_start < 0:
            raise ValueError("loss weights and disc_start must be >= 0")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError(
                f"perceptual_weight={perceptual_weight} but no perceptual network is configured: set "
                "model.vae.loss.perceptual (e.g. _target_: ldm.nets.perceptual.LPIPS with its weight paths) "
                "or model.vae.loss.perceptual_weight=0"
            )
        if disc_weight > 0 and discriminator is None:
            raise ValueError(
                f"disc_weight={disc_weight} but no discriminator is configured: set model.vae.loss.discriminator "
                "(e.g. _target_: ldm.nets.discriminator.NLayerDiscriminator) or model.vae.loss.disc_weight=0"
            )
        self.reconstruction_loss = reconstruction_loss
        self.kl_weight = float(kl_weight)
        self.perceptual_weight = float(perceptual_weight)
        # A perceptual net with weight 0 would only cost forward passes.
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.discriminator = discriminator if disc_weight > 0 else None
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.codebook_weight = float(codebook_weight)

    @property
    def uses_gan(self) -> bool:
        return self.discriminator is not None

    def gan_active(self, step: int) -> bool:
        return self.uses_gan and step >= self.disc_start

    def pixel_loss(self, inputs: Tensor, reconstructions: Tensor) -> Tensor:
        """Mean L1 or squared error over all pixels."""
        if self.reconstruction_loss == "l1":
            return F.l1_loss(reconstructions, inputs)
        return F.mse_loss(reconstructions, inputs)

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        step: int,
        posterior=None,
        codebook_loss: Tensor | None = None,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder objective. ``posterior`` (with ``.kl()``) for KL models, ``codebook_loss`` for VQ ones.

        ``last_layer`` (the decoder's output weight) is needed once the GAN is active, for the adaptive weight.
        """
        rec_loss = self.pixel_loss(inputs, reconstructions)
        logs: dict[str, Tensor] = {"rec_loss": rec_loss.detach()}
        nll_loss = rec_loss
        if self.perceptual is not None:
            p_loss = self.perceptual(reconstructions, inputs).mean()
            nll_loss = nll_loss + self.perceptual_weight * p_loss
            logs["perceptual_loss"] = p_loss.detach()
        loss = nll_loss
        if posterior is not None:
            pixels = inputs[0].numel()
            kl_loss = posterior.kl().mean()
            loss = loss + self.kl_weight * kl_loss / pixels
            logs["kl_loss"] = kl_loss.detach()
        if codebook_loss is not None:
            loss = loss + self.codebook_weight * codebook_loss
            logs["codebook_loss"] = codebook_loss.detach()
        if self.gan_active(step):
            if last_layer is None:
                raise ValueError(
                    "generator_loss needs last_layer (autoencoder.get_last_layer()) once the GAN is on"
                )
            g_loss = -self.discriminator(reconstructions).mean()
            d_weight = self.disc_weight * adaptive_gan_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * g_loss
            logs["g_loss"] = g_loss.detach()
            logs["d_weight"] = d_weight
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """GAN loss of the discriminator; ``reconstructions`` are detached so the autoencoder gets no gradient."""
        if not self.gan_active(step):
            raise ValueError(
                f"the GAN is not active at step {step} (disc_start={self.disc_start}, uses_gan={self.uses_gan})"
            )
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = self.disc_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs

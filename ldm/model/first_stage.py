"""The frozen first stage seen from stage 2: a stage-1 export plus the latent scale factor."""

from __future__ import annotations

import torch
from torch import nn

from ldm.diffusion.schedules import gaussian_noise

# Pixels a first-stage chunk may hold when no chunk size is set: at 512 px 16 images, whose full-resolution
# 128-channel fp32 activations take about 2 GB each (SD's VAE), at 256 px 64, at 32 px 4,096.
AUTO_CHUNK_PIXELS = 1 << 22


class FirstStage(nn.Module):
    """Encodes images to scaled latents ``z = scale_factor * posterior sample`` and decodes them back.

    The scale factor is a buffer, so it is recorded in every stage-2 checkpoint and export. Built from a stage-1
    export or a public autoencoder by ``ldm.io.first_stage`` (``first_stage=export`` / ``pretrained``).
    """

    def __init__(
        self, autoencoder: nn.Module, scale_factor: float, sample_posterior: bool = True, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        # Encode/decode at most this many images at once (None: as many as AUTO_CHUNK_PIXELS allow): bounds
        # activation memory for large batches.
        self.chunk_size = chunk_size
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and int(value) < 1:
            raise ValueError(f"chunk_size must be a positive number of images or None (automatic), got {value}")
        self._chunk_size = None if value is None else int(value)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.embed_dim)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std, unscaled: (B, C, h, w) each. What the latent cache stores."""
        moments = [self.autoencoder.encode(chunk) for chunk in self._chunks(images, images.shape[-2] * images.shape[-1])]
        if len(moments) == 1:
            return moments[0].mean, moments[0].std
        return torch.cat([m.mean for m in moments]), torch.cat([m.std for m in moments])

    def scale(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None):
        if self.sample_posterior:
            noise = gaussian_noise(tuple(mean.shape), mean, generator)
            mean = mean + std * noise
        return mean * self.scale_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.scale(*self.encode_moments(images), generator=generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scale_factor
        pixels = z.shape[-2] * z.shape[-1] * self.downsample_factor**2
        return torch.cat([self.autoencoder.decode(chunk) for chunk in self._chunks(z, pixels)])

    def _chunks(self, x: torch.Tensor, pixels: int) -> tuple[torch.Tensor, ...]:
        """``x`` in chunks of ``chunk_size`` images, or automatically of as many images of ``pixels`` pixels as
        AUTO_CHUNK_PIXELS allow (the whole batch at 32 px, 16 images at 512 px)."""
        size = self.chunk_size or max(1, AUTO_CHUNK_PIXELS // max(1, pixels))
        return x.split(size) if size < len(x) else (x,)

    def train(self, mode: bool = True) -> FirstStage:
        # Frozen: always in eval mode (no dropout, fixed norms), whatever Lightning asks.
        super().train(mode)
        self.autoencoder.eval()
        return self

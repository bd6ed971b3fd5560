"""The frozen first stage seen from stage 2: a stage-1 export plus the latent scale factor."""

from __future__ import annotations

import torch
from torch import nn

from ldm.diffusion.schedules import gaussian_noise


class FirstStage(nn.Module):
    """Encodes images to scaled latents ``z = scale_factor * posterior sample`` and decodes them back.

    The scale factor is a buffer, so it is recorded in every stage-2 checkpoint and export. Built from a stage-1
    export or a public autoencoder by ``ldm.io.first_stage`` (``first_stage=export`` / ``pretrained``).
    """

    def __init__(
        self, autoencoder: nn.Module, scale_factor: float, sample_posterior: bool = True, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of images or None, got {chunk_size}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        # Encode/decode at most this many images at once: bounds activation memory for large batches.
        self.chunk_size = chunk_size
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.embed_dim)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std, unscaled: (B, C, h, w) each. What the latent cache stores."""
        moments = [self.autoencoder.encode(chunk) for chunk in self._chunks(images)]
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
        return torch.cat([self.autoencoder.decode(chunk) for chunk in self._chunks(z)])

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(self.chunk_size) if self.chunk_size else (x,)

    def train(self, mode: bool = True) -> FirstStage:
        # Frozen: always in eval mode (no dropout, fixed norms), whatever Lightning asks.
        super().train(mode)
        self.autoencoder.eval()
        return self

"""The frozen first stage seen from stage 2: a stage-1 export plus the latent scale factor."""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.config import ConfigError
from ldm.io.export import load_autoencoder


class FirstStage(nn.Module):
    """Encodes images to scaled latents ``z = scale_factor * posterior sample`` and decodes them back.

    ``scale_factor=None`` means 1/std of the latents measured on the training data at the end of stage 1
    (scale_by_std, as CompVis), read from the export; the value used is a buffer, so it is recorded in
    every stage-2 checkpoint and export.
    """

    def __init__(self, autoencoder: nn.Module, scale_factor: float, sample_posterior: bool = True) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    @classmethod
    def from_export(
        cls,
        path: str,
        latent_channels: int | None = None,
        scale_factor: float | None = None,
        sample_posterior: bool = True,
    ) -> FirstStage:
        """The Hydra entry (``first_stage=export``): a stage-1 export folder, checked against the config."""
        autoencoder, meta = load_autoencoder(path)
        if latent_channels is not None and int(latent_channels) != int(autoencoder.embed_dim):
            raise ConfigError(
                f"first_stage.latent_channels={latent_channels} but the export at {path} has "
                f"{autoencoder.embed_dim} latent channels; remove the override or use a matching export"
            )
        if scale_factor is None:
            std = meta.get("latent_std")
            if not std or not math.isfinite(std):
                raise ConfigError(f"the export at {path} records no latent std: set first_stage.scale_factor")
            scale_factor = 1.0 / std
        return cls(autoencoder, scale_factor, sample_posterior)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.embed_dim)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std, unscaled: (B, C, h, w) each. What the latent cache stores."""
        posterior = self.autoencoder.encode(images)
        return posterior.mean, posterior.std

    def scale(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None):
        if self.sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + std * noise
        return mean * self.scale_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.scale(*self.encode_moments(images), generator=generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.scale_factor)

    def train(self, mode: bool = True) -> FirstStage:
        # Frozen: always in eval mode (no dropout, fixed norms), whatever Lightning asks.
        super().train(mode)
        self.autoencoder.eval()
        return self

"""Channels concatenated to the backbone input (masked-image latents + mask, a low-resolution image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.nets.conditioners.base import Embedder


class ConcatConditioner(Embedder):
    """Passes batch[input_key] (B, channels, h, w) through, to be concatenated to the UNet input
    (masked-image latents + mask for inpainting, a low-resolution image for super-resolution).
    The unconditional input is all zeros. Not guided by default: guidance keeps it in both branches."""

    output = "concat"

    def __init__(self, input_key: str, channels: int, drop_rate: float = 0.1, guided: bool = False):
        super().__init__(input_key, drop_rate, guided)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        self.channels = channels

    def encode(self, image: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != self.channels:
            shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"batch['{self.input_key}'] must be (B, {self.channels}, h, w), got {shape}.")
        return torch.where(drop.to(image.device)[:, None, None, None], torch.zeros_like(image), image)

    def unconditional(
        self, batch_size: int, device: torch.device | str | None = None, spatial_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        if spatial_size is None:
            raise ValueError("ConcatConditioner.unconditional needs spatial_size=(h, w) of the latents.")
        return torch.zeros(batch_size, self.channels, *spatial_size, device=device)

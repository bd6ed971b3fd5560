"""Inpainting conditioning as in SD-inpainting: the backbone sees [noisy latents, mask, masked-image latents]."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError
from ldm.nets.conditioners import ConcatConditioner

# The batch key the `cond=inpaint` embedder reads (and fills in `prepare`).
INPAINT_KEY = "inpaint_concat"


def random_box_masks(
    batch_size: int, size: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(B, 1, size, size) masks, 1 = hole to fill: one random rectangle per image, a quarter to three
    quarters of each side, so the model learns to fill small and large holes."""
    on = generator.device if generator is not None else torch.device("cpu")
    sides = torch.randint(size // 4, 3 * size // 4 + 1, (batch_size, 2), generator=generator, device=on)
    corners = (torch.rand(batch_size, 2, generator=generator, device=on) * (size - sides + 1)).long()
    grid = torch.arange(size, device=on)
    rows = (grid[None] >= corners[:, :1]) & (grid[None] < corners[:, :1] + sides[:, :1])  # (B, size)
    cols = (grid[None] >= corners[:, 1:]) & (grid[None] < corners[:, 1:] + sides[:, 1:])
    masks = (rows[:, :, None] & cols[:, None, :]).float().unsqueeze(1)
    return masks.to(device) if device is not None else masks


@torch.no_grad()
def inpaint_condition(first_stage, images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """(B, 1 + C, h, w): the hole mask at latent size, then the scaled latents of the image with the
    holes blanked (set to 0, mid-grey in [-1, 1]), as SD-inpainting orders them."""
    masked = images * (1.0 - holes)
    mean, _ = first_stage.encode_moments(masked)
    latent_mask = F.interpolate(holes, size=mean.shape[-2:], mode="nearest")
    return torch.cat([latent_mask, mean * first_stage.scale_factor], dim=1)


class InpaintEmbedder(ConcatConditioner):
    """Inpainting as an ordinary embedder (SD-inpainting's concat conditioning): `prepare` cuts random holes
    into the batch's images and encodes [mask, masked-image latents] with the first stage into
    ``batch[input_key]``; the concat channels then join the noisy latents. A batch that already carries
    ``input_key`` (sampling: the user's image and mask) passes through.

    Not guided by default (as diffusers' inpainting pipeline): guidance keeps the masked image in both branches,
    or the kept region would become scale * z0 - (scale - 1) * x0_uncond.
    """

    needs_images = True

    def __init__(self, latent_channels: int, input_key: str = INPAINT_KEY, drop_rate: float = 0.0,
                 guided: bool = False) -> None:
        super().__init__(input_key, channels=int(latent_channels) + 1, drop_rate=drop_rate, guided=guided)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ()  # made from the images in `prepare`

    def prepare(self, batch: dict[str, Any], first_stage: nn.Module, generator: torch.Generator | None = None):
        if self.input_key in batch:
            return batch
        if "image" not in batch:
            raise ConfigError("cond=inpaint masks and encodes the images themselves: turn stage.latent_cache off "
                              "(or use data with images)")
        images = batch["image"]
        holes = random_box_masks(images.shape[0], images.shape[-1], generator).to(images.device)
        return {**batch, self.input_key: inpaint_condition(first_stage, images, holes)}

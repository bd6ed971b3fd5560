"""Inpainting conditioning as in SD-inpainting: the UNet sees [noisy latents, mask, masked-image latents]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The batch key the `cond=inpaint` ConcatConditioner reads.
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

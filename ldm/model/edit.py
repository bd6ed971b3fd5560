"""Image editing in latent space for any sampler: SDEdit and RePaint-style inpainting."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class LatentEdit:
    """Image editing in latent space, for any sampler.

    SDEdit (Meng et al. 2022): noise the given latents ``z0`` to t = strength * (T - 1) and denoise from
    there. Inpainting: wherever ``keep`` is 1 the denoiser's x0 estimate is replaced by the known latents
    at every step (RePaint-style masking in latent space, Lugmayr et al. 2022), so the sampler's trajectory
    is pulled onto the known content there and generates the rest consistently with it.
    """

    z0: torch.Tensor  # (N, C, h, w) scaled latents of the init images
    strength: float = 1.0
    keep: torch.Tensor | None = None  # (N, 1, h, w) in [0, 1]; 1 = keep the init content

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    def slice(self, start: int, stop: int, device: torch.device) -> LatentEdit:
        keep = None if self.keep is None else self.keep[start:stop].to(device)
        return LatentEdit(self.z0[start:stop].to(device), self.strength, keep)

    def keep_known(self, denoise: Callable) -> Callable:
        if self.keep is None:
            return denoise

        def masked(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            return self.keep * self.z0 + (1 - self.keep) * denoise(x_t, t, cond)

        return masked

    def start(self, noise: torch.Tensor, schedule: Any, kwargs: dict[str, Any]):
        """(x at the first timestep, sampler kwargs) for a run that starts at strength * (T - 1)."""
        if self.strength >= 1.0:
            return noise, kwargs
        last = schedule.num_train_timesteps - 1
        t_start = max(1, round(self.strength * last))
        steps = max(1, round(int(kwargs.pop("steps", 50)) * self.strength))
        kwargs.pop("timestep_spacing", None)
        if kwargs.pop("karras", False):
            # Karras sigmas run from the schedule's sigma_max; an edit starts part-way, at t_start.
            log.info("img2img starts at the discrete timestep %d: this edit samples on the schedule's timesteps, "
                     "not Karras sigmas (set sampler.karras=false to say so)", t_start)
        timesteps = torch.linspace(t_start, 0, steps + 1)[:-1].round().long().unique_consecutive().tolist()
        t = torch.full((noise.shape[0],), t_start, device=noise.device)
        return schedule.q_sample(self.z0, t, noise), {**kwargs, "timesteps": timesteps}

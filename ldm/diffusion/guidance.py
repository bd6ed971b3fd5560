"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objective import Denoiser
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch


def _batch_conditions(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """Concatenate cond and uncond along the batch dim per key; None stays None; uncond of batch 1 is expanded."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} must match")
    batched = {}
    for key, c in cond.items():
        u = uncond[key]
        if c is None or u is None:
            if c is not None or u is not None:
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or both be None")
            batched[key] = None
            continue
        if u.shape[0] == 1 and batch_size != 1:
            u = u.expand(batch_size, *u.shape[1:])
        if c.shape[0] != batch_size or u.shape != c.shape:
            raise ValueError(
                f"cond[{key!r}] {tuple(c.shape)} and uncond[{key!r}] {tuple(u.shape)} must have batch {batch_size} "
                "(uncond may have batch 1) and the same shape"
            )
        batched[key] = torch.cat([c, u.to(c.device)])
    return batched


class ClassifierFreeGuidance:
    """Guided denoiser x0 = x0_uncond + scale * (x0_cond - x0_uncond) from ONE batched call on [cond, uncond].

    Guidance on x0 equals guidance on eps or v: at a fixed x_t they are affine in each other with weights that
    sum to one. scale = 1 returns the conditional prediction exactly, with no unconditional pass.

    `uncond` holds the unconditional inputs (same keys as cond, e.g. the empty-prompt embedding or the null
    class; batch 1 is broadcast). `rescale` = phi > 0 applies guidance rescale (Lin et al. 2023, sec. 3.4):
    the guided v-prediction is scaled to the per-sample std of the conditional one and mixed with weight phi;
    it is done in v space as in the paper, so it needs the schedule.
    """

    def __init__(
        self,
        denoise: Denoiser,
        uncond: Mapping[str, Any],
        scale: float,
        rescale: float = 0.0,
        schedule: NoiseSchedule | None = None,
    ):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be in [0, 1], got {rescale}")
        if rescale > 0 and schedule is None:
            raise ValueError("guidance rescale works on v-predictions: pass the NoiseSchedule as schedule=")
        self.denoise = denoise
        self.uncond = dict(uncond)
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.schedule = schedule

    def __call__(self, x_t: Tensor, t: Tensor, cond: Mapping[str, Any]) -> Tensor:
        if self.scale == 1.0:
            return self.denoise(x_t, t, cond)
        if not isinstance(cond, Mapping):
            raise ValueError(
                f"classifier-free guidance needs cond as a dict of tensors, got {type(cond).__name__}"
            )
        batch = x_t.shape[0]
        both = self.denoise(
            torch.cat([x_t, x_t]), torch.cat([t, t]), _batch_conditions(cond, self.uncond, batch)
        )
        x0_cond, x0_uncond = both.chunk(2)
        guided = x0_uncond + self.scale * (x0_cond - x0_uncond)
        if self.rescale > 0:
            guided = self._rescale(guided, x0_cond, x_t, t)
        return guided

    def _rescale(self, x0_guided: Tensor, x0_cond: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha = expand_as_batch(self.schedule.alpha(t, x_t.dtype), x_t)
        sigma = expand_as_batch(self.schedule.sigma(t, x_t.dtype), x_t)
        v_guided = (alpha * x_t - x0_guided) / sigma
        v_cond = (alpha * x_t - x0_cond) / sigma
        dims = tuple(range(1, x_t.ndim))
        ratio = v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True)
        v = self.rescale * (v_guided * ratio) + (1.0 - self.rescale) * v_guided
        return alpha * x_t - sigma * v

"""Guidance as denoiser wrappers: one contract ``denoise(x_t, t, cond) -> x0_hat`` for every method, so no
sampler knows which one runs.

- classifier-free guidance (Ho & Salimans 2022): the reference branch is the same network without the condition;
- autoguidance (Karras et al., "Guiding a diffusion model with a bad version of itself", NeurIPS 2024): the
  reference branch is a weaker *conditional* model of the same family (less trained, or smaller);
- either one limited to a band of noise levels (Kynkäänniemi et al., "Applying guidance in a limited interval
  improves sample and distribution quality in diffusion models", NeurIPS 2024): outside the band the wrapper
  returns the plain conditional prediction with one network call;
- guidance rescale (Lin et al. 2023, sec. 3.4) on top of either.

All are x0 = x0_ref + scale * (x0_cond - x0_ref); guidance on x0 equals guidance on eps or v, since at a
fixed x_t they are affine in each other with weights that sum to one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objective import Denoiser
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch

INTERVAL_UNITS = ("sigma", "t")


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


class GuidanceInterval:
    """The band of noise levels low <= level <= high where guidance is applied (Kynkäänniemi et al. 2024).

    unit "sigma": the EDM noise level sigma_t / alpha_t of the VP schedule (the paper's sigma; their EDM2
    ImageNet-512 band is (0.28, 5.42]); unit "t": the training timestep in [0, T-1] (diffusers' convention,
    e.g. low=0, high=600). Guidance at high noise is what collapses diversity; at very low noise it does little.
    """

    def __init__(self, low: float = 0.0, high: float = math.inf, unit: str = "sigma") -> None:
        if unit not in INTERVAL_UNITS:
            raise ValueError(f"guidance interval unit must be one of {INTERVAL_UNITS}, got {unit!r}")
        low, high = float(low), float(high)
        if not 0.0 <= low <= high:
            raise ValueError(f"guidance interval needs 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high, self.unit = low, high, unit

    def __repr__(self) -> str:
        return f"GuidanceInterval({self.low:g} <= {self.unit} <= {self.high:g})"

    def contains(self, t: Tensor, schedule: NoiseSchedule | None) -> Tensor:
        """(B,) bool: which samples' noise level lies in the band (t: the model time the samplers pass)."""
        if self.unit == "t":
            level = t.double()
        else:
            if schedule is None:
                raise ValueError("a guidance interval in sigma needs the NoiseSchedule: pass schedule=")
            level = schedule.ve_sigma(t, torch.float64).to(t.device)
        return (level >= self.low) & (level <= self.high)


class _Guided:
    """x0 = x0_ref + scale * (x0_cond - x0_ref), optionally within an interval and rescaled; subclasses say
    how the conditional and the reference predictions are computed."""

    def __init__(self, scale: float, rescale: float, schedule: NoiseSchedule | None,
                 interval: GuidanceInterval | None) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be in [0, 1], got {rescale}")
        if rescale > 0 and schedule is None:
            raise ValueError("guidance rescale works on v-predictions: pass the NoiseSchedule as schedule=")
        if interval is not None and interval.unit == "sigma" and schedule is None:
            raise ValueError("a guidance interval in sigma needs the NoiseSchedule: pass schedule=")
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.schedule = schedule
        self.interval = interval

    def conditional(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        raise NotImplementedError

    def branches(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """(x0_cond, x0_ref)."""
        raise NotImplementedError

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.scale == 1.0:
            return self.conditional(x_t, t, cond)
        if self.interval is None:
            return self._guided(x_t, t, cond)[0]
        inside = self.interval.contains(t, self.schedule)
        # One host read per network call, at sampling time only: outside the band the reference branch's call is
        # skipped, which is the point of the band on a sampler's cost as well as on its samples.
        if not bool(inside.any()):
            return self.conditional(x_t, t, cond)
        guided, x0_cond = self._guided(x_t, t, cond)
        if bool(inside.all()):
            return guided
        return torch.where(expand_as_batch(inside, x_t), guided, x0_cond)

    def _guided(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        x0_cond, x0_ref = self.branches(x_t, t, cond)
        guided = x0_ref + self.scale * (x0_cond - x0_ref)
        if self.rescale > 0:
            guided = self._rescale(guided, x0_cond, x_t, t)
        return guided, x0_cond

    def _rescale(self, x0_guided: Tensor, x0_cond: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha = expand_as_batch(self.schedule.alpha(t, x_t.dtype), x_t)
        sigma = expand_as_batch(self.schedule.sigma(t, x_t.dtype), x_t)
        v_guided = (alpha * x_t - x0_guided) / sigma
        v_cond = (alpha * x_t - x0_cond) / sigma
        dims = tuple(range(1, x_t.ndim))
        ratio = v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True)
        v = self.rescale * (v_guided * ratio) + (1.0 - self.rescale) * v_guided
        return alpha * x_t - sigma * v


class ClassifierFreeGuidance(_Guided):
    """Classifier-free guidance (Ho & Salimans 2022) from ONE batched call on [cond, uncond].

    scale = 1 returns the conditional prediction exactly, with no unconditional pass. `uncond` holds the
    unconditional inputs (same keys as cond, e.g. the empty-prompt embedding or the null class; batch 1 is
    broadcast). `rescale` = phi > 0 applies guidance rescale (Lin et al. 2023, sec. 3.4): the guided
    v-prediction is scaled to the per-sample std of the conditional one and mixed with weight phi; it is done
    in v space as in the paper, so it needs the schedule. `interval`: guide only within that band of noise
    levels (Kynkäänniemi et al. 2024).
    """

    def __init__(
        self,
        denoise: Denoiser,
        uncond: Mapping[str, Any],
        scale: float,
        rescale: float = 0.0,
        schedule: NoiseSchedule | None = None,
        interval: GuidanceInterval | None = None,
    ):
        super().__init__(scale, rescale, schedule, interval)
        self.denoise = denoise
        self.uncond = dict(uncond)

    def conditional(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.denoise(x_t, t, cond)

    def branches(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(cond, Mapping):
            raise ValueError(
                f"classifier-free guidance needs cond as a dict of tensors, got {type(cond).__name__}"
            )
        both = self.denoise(
            torch.cat([x_t, x_t]), torch.cat([t, t]), _batch_conditions(cond, self.uncond, x_t.shape[0])
        )
        x0_cond, x0_uncond = both.chunk(2)
        return x0_cond, x0_uncond


class Autoguidance(_Guided):
    """Autoguidance (Karras et al. 2024): the reference is `guide`, a weaker conditional model of the same
    family (an earlier EMA snapshot of the same run, or a smaller preset on the same first stage and
    conditioning), queried with the same condition: x0 = x0_guide + scale * (x0_model - x0_guide).

    Both models' errors point the same way where the model is unsure, and the guide's more so, so the
    difference pushes away from them without the loss of diversity of an unconditional reference.
    `guide_cond`: the guide's own embedding of the same conditions (its learned embeddings differ from the
    model's); None = the call's cond. rescale and interval as in ClassifierFreeGuidance.
    """

    def __init__(
        self,
        denoise: Denoiser,
        guide: Denoiser,
        scale: float,
        guide_cond: Any = None,
        rescale: float = 0.0,
        schedule: NoiseSchedule | None = None,
        interval: GuidanceInterval | None = None,
    ):
        super().__init__(scale, rescale, schedule, interval)
        self.denoise = denoise
        self.guide = guide
        self.guide_cond = guide_cond

    def conditional(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.denoise(x_t, t, cond)

    def branches(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        guide_cond = cond if self.guide_cond is None else self.guide_cond
        return self.denoise(x_t, t, cond), self.guide(x_t, t, guide_cond)

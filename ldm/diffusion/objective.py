"""The diffusion training loss (Ho et al. 2020), with the prediction type, weighting and noise as options."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.parameterization import PREDICTION_TYPES, EDMPreconditioner, Parameterization
from ldm.diffusion.schedules import NoiseSchedule, gaussian_noise
from ldm.diffusion.weighting import WEIGHTINGS, loss_weight

LOSS_TYPES = ("l2", "l1")

# model_fn(net_input, t, cond) -> raw network output; t is a float tensor (B,).
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
# denoise(x_t, t, cond) -> x0_hat, with x_t in VP space and t float (B,) in [0, T-1]: the sampler contract.
Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


# Below this alpha(T-1), eps prediction's first sampling step x0 = (x_t - sigma eps) / alpha multiplies the eps
# error by sigma / alpha > 1000 (cosine: ~20,000, sigmoid: ~1,800; linear 157, scaled_linear 15).
EPS_MIN_TERMINAL_ALPHA = 1e-3


def _check_prediction_vs_schedule(schedule: NoiseSchedule, prediction: str) -> None:
    if schedule.zero_terminal_snr and prediction == "eps":
        raise ValueError(
            "eps prediction cannot be used with zero_terminal_snr: alpha_T = 0 there, so x0 = (x_t - sigma eps) / "
            "alpha is undefined at the last step; use prediction='v' (Lin et al. 2023) or 'x0'/'edm'"
        )
    last = schedule.num_train_timesteps - 1
    alpha_last = float(schedule.alpha(last, torch.float64))
    if prediction == "eps" and alpha_last < EPS_MIN_TERMINAL_ALPHA:
        # A warning, not an error: studies compare eps + cosine on purpose (experiments/prediction).
        warnings.warn(
            f"eps prediction with the {schedule.kind!r} schedule: alpha(T-1) = {alpha_last:.2g}, so the first "
            f"sampling step from pure noise multiplies the eps error by sigma/alpha = "
            f"{float(schedule.ve_sigma(last, torch.float64)):,.0f} (experiments/prediction measured FID 1199 for "
            "eps + cosine). Use objective=v (or x0), or a schedule whose alpha(T-1) >= 1e-3 (linear, scaled_linear).",
            UserWarning,
            stacklevel=3,
        )


def denoiser(model_fn: ModelFn, parameterization: Parameterization) -> Denoiser:
    """Wrap a raw network into the sampler contract denoise(x_t, t, cond) -> x0_hat."""
    _check_prediction_vs_schedule(parameterization.schedule, parameterization.prediction)

    def denoise(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = model_fn(parameterization.model_input(x_t, t), parameterization.model_time(t), cond)
        return parameterization.to_x0(out.to(x_t.dtype), x_t, t)

    return denoise


class DiffusionObjective:
    """Noise-prediction style diffusion loss with selectable target, loss, weighting and offset noise.

    prediction: "eps" | "x0" | "v" | "edm" (EDM preconditioning with `sigma_data`, Karras et al. 2022).
    loss_type: "l2" | "l1" (the weighting, derived for l2, is applied unchanged to l1).
    weighting: "none" | "min_snr" (Hang et al. 2023, gamma=min_snr_gamma) | "edm"; see ldm.diffusion.weighting.
    offset_noise: adds offset * N(0, 1) per (sample, channel) to the noise (Guttenberg 2023), which lets the
        model change the mean of an image (very dark/bright samples).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        loss_type: str = "l2",
        weighting: str = "none",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        sigma_data: float = 0.5,
    ):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTION_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        if offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
        _check_prediction_vs_schedule(schedule, prediction)
        if offset_noise > 0 and schedule.zero_terminal_snr:
            # At SNR = 0, x_T is the noise itself: training then teaches the model x_T ~ N(0, 1 + offset^2) per
            # channel mean, while every sampler starts from N(0, I). Lin et al. 2023 propose zero terminal SNR
            # as the replacement for offset noise; both at once is legal (it runs) but mismatched.
            warnings.warn(
                f"offset_noise={offset_noise} with zero_terminal_snr: the last step trains on noise of variance "
                f"1 + offset_noise^2 = {1 + offset_noise**2:g} but sampling starts from N(0, I); zero terminal SNR "
                "already lets the model change an image's mean (Lin et al. 2023): set offset_noise=0.",
                UserWarning,
                stacklevel=2,
            )
        self.schedule = schedule
        self.prediction = prediction
        self.loss_type = loss_type
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.sigma_data = sigma_data
        preconditioner = EDMPreconditioner(sigma_data) if prediction == "edm" else None
        self.parameterization = Parameterization(schedule, prediction, preconditioner)

    def sample_timesteps(
        self, batch_size: int, like: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Uniform integer timesteps (B,) in [0, T-1] on like's device."""
        device = generator.device if generator is not None else like.device
        t = torch.randint(
            0, self.schedule.num_train_timesteps, (batch_size,), generator=generator, device=device
        )
        return t.to(like.device)

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I), plus offset * N(0, 1) shared over the spatial dims of each (sample, channel)."""
        noise = gaussian_noise(tuple(x0.shape), x0, generator)
        if self.offset_noise > 0:
            offset_shape = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)  # (B, C, 1, 1)
            noise = noise + self.offset_noise * gaussian_noise(offset_shape, x0, generator)
        return noise

    def weights(self, t: Tensor) -> Tensor:
        """Loss weight (B,) float32 at timesteps t."""
        snr = self.schedule.snr(t, torch.float64)
        w = loss_weight(self.weighting, snr, self.prediction, self.min_snr_gamma, self.sigma_data)
        return w.float()

    def loss(
        self, model_fn: ModelFn, x0: Tensor, cond: Any = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(per-sample weighted loss (B,) float32, timesteps t (B,) long) for clean samples x0 (B, C, ...).

        model_fn(net_input, t_float, cond) returns the raw network output; the loss is computed in float32
        whatever dtype the network runs in.
        """
        if x0.ndim < 2:
            raise ValueError(f"x0 must be batched (B, C, ...), got shape {tuple(x0.shape)}")
        t = self.sample_timesteps(x0.shape[0], x0, generator)
        noise = self.sample_noise(x0, generator)
        x0_32, noise_32 = x0.float(), noise.float()
        x_t = self.schedule.q_sample(x0_32, t, noise_32)
        param = self.parameterization
        out = model_fn(param.model_input(x_t, t).to(x0.dtype), param.model_time(t), cond)
        if out.shape != x0.shape:
            raise ValueError(
                f"model output shape {tuple(out.shape)} must equal the input shape {tuple(x0.shape)}"
            )
        error = out.float() - param.target(x0_32, noise_32, t)
        error = error.square() if self.loss_type == "l2" else error.abs()
        per_sample = error.flatten(1).mean(dim=1)
        return self.weights(t) * per_sample, t

    def denoiser(self, model_fn: ModelFn) -> Denoiser:
        """The trained network as a sampler denoiser (see `denoiser`)."""
        return denoiser(model_fn, self.parameterization)

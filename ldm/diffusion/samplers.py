"""Samplers for VP diffusion models, k-diffusion style: one function per algorithm, one contract.

Every sampler takes
  denoise(x_t, t, cond) -> x0_hat   x_t in VP space (x_t = alpha_t x0 + sigma_t eps), t a float tensor (B,) of
                                     integer or fractional timesteps in [0, T-1] (see ldm.diffusion.objective.denoiser)
  noise                             the initial N(0, I) sample, taken as x_t at the first timestep
  schedule                          the NoiseSchedule the model was trained with
  steps, timestep_spacing           "leading" | "trailing" | "linspace" (schedules.sampling_timesteps), or an
                                     explicit descending `timesteps` list
  cond, generator, callback(i, x, x0_hat), clip_x0 (None, or a bound for pixel-space x0; latents are unbounded)
and returns the sample at t = 0 ("x0"). After the last timestep every sampler steps to the clean sample
(alphas_cumprod = 1, VE sigma = 0). The ODE samplers (Euler, Heun, DPM-Solver++) also run on Karras sigmas
(`karras=True`), the network then being queried at the fractional timesteps of those sigmas.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objective import Denoiser
from ldm.diffusion.schedules import NoiseSchedule, gaussian_noise, karras_sigmas, sampling_timesteps

Callback = Callable[[int, Tensor, Tensor], None]


def _discrete_timesteps(
    schedule: NoiseSchedule, steps: int | None, spacing: str, timesteps: Sequence[int] | None
) -> list[int]:
    if timesteps is None:
        ts = sampling_timesteps(schedule.num_train_timesteps, steps, spacing).tolist()
        last = schedule.num_train_timesteps - 1
        if schedule.zero_terminal_snr and ts[0] < last:
            warnings.warn(
                f"timestep_spacing={spacing} starts at t={ts[0]}, not at the zero-SNR step t={last}: the pure "
                f"noise the sampler starts from is then taken for x_{ts[0]}, which still holds signal, so the "
                "brightness/contrast the model was trained to generate from pure noise is lost (Lin et al. 2023, "
                "sec. 3.3). Use timestep_spacing=trailing (or linspace).",
                UserWarning,
                stacklevel=3,
            )
        return ts
    ts = [int(t) for t in timesteps]
    if (
        not ts
        or any(a <= b for a, b in zip(ts, ts[1:]))
        or ts[-1] < 0
        or ts[0] > schedule.num_train_timesteps - 1
    ):
        raise ValueError(
            f"timesteps must be strictly decreasing integers in [0, {schedule.num_train_timesteps - 1}], got {ts}"
        )
    return ts


def _ve_levels(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str,
    timesteps: Sequence[int] | None,
    karras: bool,
    rho: float,
) -> tuple[list[float], list[float]]:
    """(model timesteps, VE sigmas) of the evaluation points; zero-terminal-SNR sigmas are capped."""
    if karras:
        if timesteps is not None:
            raise ValueError("pass either karras=True or explicit timesteps, not both")
        sigmas = karras_sigmas(steps, schedule.ve_sigma_min, schedule.ve_sigma_max, rho)
        return schedule.t_from_ve_sigma(sigmas, torch.float64).tolist(), sigmas.tolist()
    ts = _discrete_timesteps(schedule, steps, spacing, timesteps)
    sigmas = schedule.ve_sigma(torch.tensor(ts), torch.float64).clamp(max=schedule.ve_sigma_max)
    return [float(t) for t in ts], sigmas.tolist()


def _time(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)


def _clip(x0: Tensor, clip_x0: float | None) -> Tensor:
    return x0 if clip_x0 is None else x0.clamp(-clip_x0, clip_x0)


def _abar(schedule: NoiseSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def sample_ddpm(
    denoise: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    cond: Any = None,
    *,
    timestep_spacing: str = "trailing",
    timesteps: Sequence[int] | None = None,
    variance: str = "small",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """Ancestral sampling x_s ~ q(x_s | x_t, x0_hat) (Ho et al. 2020, Algorithm 2; DDPM eq. 6-7).

    With fewer steps than T the chain is strided, beta_ts = 1 - abar_t / abar_s (Nichol & Dhariwal 2021,
    sec. 4). variance "small" is the posterior variance beta~ (DDPM's sigma_t^2 = beta~_t), "large" is beta_ts.
    steps=None runs all T steps. No noise is added on the final step into the clean sample.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    steps = schedule.num_train_timesteps if steps is None else steps
    ts = _discrete_timesteps(schedule, steps, timestep_spacing, timesteps)
    prev = ts[1:] + [-1]
    c_x0s, c_xts, variances = (
        c.tolist() for c in schedule.posterior_coefficients(torch.tensor(ts), torch.tensor(prev))
    )
    if variance == "large":
        variances = [1.0 - _abar(schedule, t) / _abar(schedule, s) for t, s in zip(ts, prev)]
    x = noise
    for i, t in enumerate(ts):
        x0_hat = _clip(denoise(x, _time(t, x), cond), clip_x0)
        x = c_x0s[i] * x0_hat + c_xts[i] * x
        if prev[i] >= 0:
            x = x + math.sqrt(variances[i]) * gaussian_noise(tuple(x.shape), x, generator)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


def sample_ddim(
    denoise: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int = 50,
    cond: Any = None,
    *,
    timestep_spacing: str = "trailing",
    timesteps: Sequence[int] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16); eta=0 is deterministic, eta=1 is DDPM.

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - std^2) eps_hat + std z,
    std = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
    eps_hat is re-derived from (the possibly clipped) x0_hat. Unlike diffusers' DDIMScheduler, which jumps to
    t - T // steps, every step lands on the next timestep of the list, so "linspace" spacing is consistent.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = _discrete_timesteps(schedule, steps, timestep_spacing, timesteps)
    x = noise
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        abar_t, abar_s = _abar(schedule, t), _abar(schedule, s)
        x0_hat = _clip(denoise(x, _time(t, x), cond), clip_x0)
        eps_hat = (x - math.sqrt(abar_t) * x0_hat) / math.sqrt(1.0 - abar_t)
        std = eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
        x = math.sqrt(abar_s) * x0_hat + math.sqrt(max(1.0 - abar_s - std**2, 0.0)) * eps_hat
        if std > 0:
            x = x + std * gaussian_noise(tuple(x.shape), x, generator)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


def _vp_from_log_snr(log_snr: float) -> tuple[float, float]:
    lsnr = torch.tensor(log_snr, dtype=torch.float64)
    return float(torch.sigmoid(lsnr).sqrt()), float(torch.sigmoid(-lsnr).sqrt())


def sample_dpmpp_2m(
    denoise: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int = 20,
    cond: Any = None,
    *,
    timestep_spacing: str = "trailing",
    timesteps: Sequence[int] | None = None,
    karras: bool = False,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """DPM-Solver++(2M): multistep second-order solver of the data-prediction ODE (Lu et al. 2022, Algorithm 2).

    With lambda = log(alpha / sigma) and h = lambda_next - lambda:
      x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D,
      D = x0_hat (first step) or (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev with r = h_prev / h.
    The final step into sigma = 0 is first order (it returns the last x0_hat), as diffusers' lower_order_final
    and k-diffusion do. `generator` is unused (the solver is deterministic); it is accepted so every sampler
    shares one signature.
    """
    if karras:
        t_model, sigmas = _ve_levels(schedule, steps, timestep_spacing, timesteps, karras, rho)
        log_snrs = [-2.0 * math.log(s) for s in sigmas]
    else:
        ts = _discrete_timesteps(schedule, steps, timestep_spacing, timesteps)
        t_model = [float(t) for t in ts]
        # Exact table values: with zero terminal SNR, log-SNR = -inf at T-1 and the first step is the exact
        # DDIM step from pure noise.
        log_snrs = schedule.log_snr(torch.tensor(ts), torch.float64).tolist()
    log_snrs.append(math.inf)  # the clean sample
    x = noise
    x0_prev, h_prev = None, None
    for i, t in enumerate(t_model):
        x0_hat = _clip(denoise(x, _time(t, x), cond), clip_x0)
        lam, lam_next = 0.5 * log_snrs[i], 0.5 * log_snrs[i + 1]
        alpha_next, sigma_next = _vp_from_log_snr(log_snrs[i + 1])
        sigma = _vp_from_log_snr(log_snrs[i])[1]
        if math.isinf(lam_next):
            x = x0_hat
        else:
            h = lam_next - lam
            d = x0_hat
            if x0_prev is not None:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0_hat
        if callback is not None:
            callback(i, x, x0_hat)
    return x


def _vp_scale(sigma_ve: float) -> float:
    """alpha = 1 / sqrt(1 + sigma_ve^2): VE sample -> VP sample."""
    return 1.0 / math.sqrt(1.0 + sigma_ve**2)


def sample_euler(
    denoise: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int = 30,
    cond: Any = None,
    *,
    timestep_spacing: str = "trailing",
    timesteps: Sequence[int] | None = None,
    karras: bool = False,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma in VE space
    (Karras et al. 2022, Algorithm 2 without the second-order correction and with S_churn = 0).

    The VE sample x = x_t / alpha_t starts at noise * sqrt(1 + sigma_max^2), the VE image of the VP noise.
    Sigmas are the schedule's own at the spaced timesteps, or Karras' (rho = 7) between the schedule's
    sigma(0) and sigma(T-1). `generator` is unused (deterministic); it keeps the signature uniform.
    """
    t_model, sigmas = _ve_levels(schedule, steps, timestep_spacing, timesteps, karras, rho)
    sigmas.append(0.0)
    x = noise / _vp_scale(sigmas[0])
    for i, t in enumerate(t_model):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = _clip(denoise(x * _vp_scale(sigma), _time(t, x), cond), clip_x0)
        x = x + (x - x0_hat) / sigma * (sigma_next - sigma)
        if callback is not None:
            callback(i, x * _vp_scale(sigma_next), x0_hat)
    return x


def sample_heun(
    denoise: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    steps: int = 15,
    cond: Any = None,
    *,
    timestep_spacing: str = "trailing",
    timesteps: Sequence[int] | None = None,
    karras: bool = False,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2 with S_churn = 0).

    Each step takes an Euler step to sigma_next and, unless sigma_next = 0, corrects it with the average of the
    slopes at both ends: 2 * steps - 1 network evaluations (2 * steps - 2 from the pure noise of a
    zero-terminal-SNR schedule, whose first step is Euler's). Sigmas and start as in `sample_euler`.
    """
    t_model, sigmas = _ve_levels(schedule, steps, timestep_spacing, timesteps, karras, rho)
    # With zero terminal SNR a run from T-1 starts at the cap standing in for sigma = inf: the trapezoid over
    # (sigma_next, cap) would give the slope at sigma_next half of an interval that is really unbounded, so that
    # step is the Euler one, which is the exact DDIM step from pure noise (Lin et al. 2023, sec. 3.3).
    from_infinity = schedule.zero_terminal_snr and t_model[0] == schedule.num_train_timesteps - 1
    sigmas.append(0.0)
    x = noise / _vp_scale(sigmas[0])
    for i, t in enumerate(t_model):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = _clip(denoise(x * _vp_scale(sigma), _time(t, x), cond), clip_x0)
        slope = (x - x0_hat) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0 or (i == 0 and from_infinity):
            x = x_euler
        else:
            x0_next = _clip(denoise(x_euler * _vp_scale(sigma_next), _time(t_model[i + 1], x), cond), clip_x0)
            slope_next = (x_euler - x0_next) / sigma_next
            x = x + 0.5 * (slope + slope_next) * (sigma_next - sigma)
        if callback is not None:
            callback(i, x * _vp_scale(sigma_next), x0_hat)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}


def sample(name: str, denoise: Denoiser, noise: Tensor, schedule: NoiseSchedule, **kwargs: Any) -> Tensor:
    """Run the sampler registered as `name` (a key of SAMPLERS) with its keyword arguments."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    fn = SAMPLERS[name]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("denoise", "noise", "schedule")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {name!r} does not take {unknown}; it accepts {accepted}")
    return fn(denoise, noise, schedule, **kwargs)

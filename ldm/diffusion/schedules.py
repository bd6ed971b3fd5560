"""Variance-preserving noise schedules.

Convention (shared with the rest of ldm): x_t = alpha_t * x0 + sigma_t * eps with alpha_t**2 = alphas_cumprod[t],
sigma_t**2 = 1 - alphas_cumprod[t], discrete t in [0, T-1]. The "VE sigma" sigma_t / alpha_t is the noise level
of the equivalent variance-exploding process x_t / alpha_t = x0 + (sigma_t / alpha_t) * eps, used by
k-diffusion style samplers (Karras et al. 2022).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

_DEFAULT_BETA_RANGE = {"linear": (1e-4, 2e-2), "scaled_linear": (0.00085, 0.012)}
# With zero terminal SNR the VE sigma of the last step is infinite; samplers that work in VE space start from
# the sigma of alphas_cumprod = 2**-24 instead (the smallest positive fp16 subnormal, as diffusers does), or from
# higher where sigma(T-2) already exceeds it (see _sampling_ve_sigma_max).
MIN_SAMPLING_ALPHAS_CUMPROD = 2.0**-24


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Linearly spaced betas (Ho et al. 2020, DDPM)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_train_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Betas whose square roots are linearly spaced (Rombach et al. 2022, Stable Diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def _betas_from_alpha_bar(alpha_bar, num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    # beta_i = 1 - abar((i+1)/T) / abar(i/T), so alphas_cumprod[i] = abar((i+1)/T) / abar(0) until the clip.
    grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    abar = alpha_bar(grid)
    return (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def cosine_alpha_bar(u: Tensor, s: float = 0.008) -> Tensor:
    """f(u) = cos^2(((u + s) / (1 + s)) * pi / 2) for u in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): betas from alphas_cumprod = f(t)/f(0), clipped at 0.999."""
    return _betas_from_alpha_bar(lambda u: cosine_alpha_bar(u, s), num_train_timesteps, max_beta)


def sigmoid_alpha_bar(u: Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> Tensor:
    """gamma(u) of the sigmoid schedule (Jabri et al. 2022; Chen 2023, Algorithm 1), clipped at 1e-9."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    out = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    return out.clamp(min=1e-9, max=1.0)


def sigmoid_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling"), start=-3, end=3, tau=1."""
    return _betas_from_alpha_bar(sigmoid_alpha_bar, num_train_timesteps, max_beta)


def make_betas(
    kind: str, num_train_timesteps: int, beta_start: float | None = None, beta_end: float | None = None
) -> Tensor:
    """Betas (float64, shape (T,)) of one of BETA_SCHEDULES."""
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")
    if kind in _DEFAULT_BETA_RANGE:
        default_start, default_end = _DEFAULT_BETA_RANGE[kind]
        start = default_start if beta_start is None else beta_start
        end = default_end if beta_end is None else beta_end
        if not 0.0 < start <= end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={start}, beta_end={end}")
        return (linear_betas if kind == "linear" else scaled_linear_betas)(num_train_timesteps, start, end)
    if beta_start is not None or beta_end is not None:
        raise ValueError(
            f"the {kind!r} schedule is defined by alphas_cumprod; set beta_start/beta_end to null"
        )
    return cosine_betas(num_train_timesteps) if kind == "cosine" else sigmoid_betas(num_train_timesteps)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has SNR exactly 0 and the first keeps its value.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    sqrt_abar = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def vp_to_ve(alpha: Tensor, sigma: Tensor) -> Tensor:
    """VE noise level sigma_k = sigma_t / alpha_t of the VP pair (alpha_t, sigma_t)."""
    return sigma / alpha


def ve_to_vp(sigma_ve: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) with alpha_t**2 + sigma_t**2 = 1 and sigma_t / alpha_t = sigma_ve (inf maps to (0, 1))."""
    log_snr = -2.0 * torch.log(sigma_ve)
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def sampling_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0
) -> Tensor:
    """Descending integer timesteps (steps,) at which a sampler evaluates the network, as in diffusers.

    "linspace": round(linspace(0, T-1, steps)); "leading": i * (T // steps) + steps_offset (Stable Diffusion uses
    steps_offset=1); "trailing": round(T - i*T/steps) - 1, which always starts at T-1 (Lin et al. 2023, Table 2).
    After the last one, samplers step to the clean sample (alphas_cumprod = 1).
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, num_train_timesteps={num_train_timesteps}], got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "linspace":
        t = torch.linspace(0, num_train_timesteps - 1, steps, dtype=torch.float64).round().flip(0)
    elif spacing == "leading":
        t = (i * (num_train_timesteps // steps)).flip(0) + steps_offset
    else:
        t = torch.round(num_train_timesteps - i * num_train_timesteps / steps) - 1
    t = t.long()
    if t.max() > num_train_timesteps - 1 or t.min() < 0:
        raise ValueError(
            f"steps_offset={steps_offset} pushes timesteps outside [0, {num_train_timesteps - 1}]"
        )
    return t


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Descending VE sigmas (steps,) spaced uniformly in sigma**(1/rho) (Karras et al. 2022, eq. 5)."""
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


class NoiseSchedule:
    """A discrete VP schedule with T steps, queried at integer or fractional timesteps on any device.

    Everything derives from a float64 table of log-SNR(t) = log(alphas_cumprod / (1 - alphas_cumprod)); a
    fractional t interpolates it linearly, which is log-sigma interpolation of the VE sigmas (k-diffusion's
    DiscreteSchedule), so `t_from_ve_sigma` is its exact inverse. Every query returns float32 unless `dtype` says
    otherwise (float64 coefficients would silently promote a float32 batch).
    """

    def __init__(
        self,
        kind: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = kind
        self.num_train_timesteps = num_train_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = betas  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self._log_snr = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)
        self._ve_sigma_max = _sampling_ve_sigma_max(self._log_snr)
        # The same table with a finite last entry, log-SNR = -2 log(ve_sigma_max), for fractional t in
        # (T-2, T-1): there the sampler's sigma (between sigma(T-2) and the cap) and the denoiser's must agree,
        # whereas interpolating towards -inf would make every such t pure noise. Integer T-1 stays exact.
        self._capped_log_snr = self._log_snr.clone()
        self._capped_log_snr[-1] = -2.0 * math.log(self._ve_sigma_max)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )

    def _table(self, device: torch.device, capped: bool = False) -> Tensor:
        """The exact log-SNR table, or (capped=True) the one fractional t interpolates, on device."""
        if device not in self._tables:
            dtype = _compute_dtype(device)
            self._tables[device] = (
                self._log_snr.to(device=device, dtype=dtype),
                self._capped_log_snr.to(device=device, dtype=dtype),
            )
        return self._tables[device][1 if capped else 0]

    def _as_time(self, t: Tensor | float | int) -> Tensor:
        t = torch.as_tensor(t)
        # NaN compares False with both bounds, so it is named explicitly (it would index the table garbage).
        if t.device.type == "cpu" and t.numel() and (
            t.min() < 0 or t.max() > self.num_train_timesteps - 1 or (t.is_floating_point() and t.isnan().any())
        ):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}] (not NaN), got {t}")
        return t

    def _log_snr_at(self, t: Tensor | float | int) -> Tensor:
        """log-SNR in the device's compute dtype (float64 except on MPS)."""
        t = self._as_time(t)
        table = self._table(t.device)
        if not t.is_floating_point():
            return table[t]
        capped = self._table(t.device, capped=True)
        t = t.to(table.dtype).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        lo, hi = table[low], capped[low + 1]
        # Explicit endpoints: t = T-1 is exact (-inf with zero terminal SNR, where 0 * inf would be nan); in
        # (T-2, T-1) the capped entry keeps alpha > 0, matching t_from_ve_sigma.
        return torch.where(w == 0, lo, torch.where(w == 1, table[low + 1], lo + w * (hi - lo)))

    def log_snr(self, t: Tensor | float | int, dtype: torch.dtype = torch.float32) -> Tensor:
        """log(alpha_t**2 / sigma_t**2) at integer or fractional t (same shape and device as t)."""
        return self._log_snr_at(t).to(dtype)

    def alphas_cumprod_at(self, t: Tensor | float | int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.sigmoid(self._log_snr_at(t)).to(dtype)

    def alpha(self, t: Tensor | float | int, dtype: torch.dtype = torch.float32) -> Tensor:
        """alpha_t = sqrt(alphas_cumprod[t]), the signal scale."""
        return torch.sigmoid(self._log_snr_at(t)).sqrt().to(dtype)

    def sigma(self, t: Tensor | float | int, dtype: torch.dtype = torch.float32) -> Tensor:
        """sigma_t = sqrt(1 - alphas_cumprod[t]), the noise scale (computed without cancellation near t=0)."""
        return torch.sigmoid(-self._log_snr_at(t)).sqrt().to(dtype)

    def snr(self, t: Tensor | float | int, dtype: torch.dtype = torch.float32) -> Tensor:
        """alpha_t**2 / sigma_t**2 (exactly 0 at the last step of a zero-terminal-SNR schedule)."""
        return self._log_snr_at(t).exp().to(dtype)

    def ve_sigma(self, t: Tensor | float | int, dtype: torch.dtype = torch.float32) -> Tensor:
        """sigma_t / alpha_t, the equivalent VE noise level (k-diffusion's sigma)."""
        return torch.exp(-0.5 * self._log_snr_at(t)).to(dtype)

    def t_from_ve_sigma(self, sigma_ve: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        """Fractional timestep whose VE sigma is sigma_ve, by log-sigma interpolation (inverse of ve_sigma).

        With zero terminal SNR the last table entry is taken at the capped `ve_sigma_max` (the true one is
        infinite), so sigmas between sigma(T-2) and ve_sigma_max map into (T-2, T-1], as diffusers does, and
        `ve_sigma` maps them back. Sigmas beyond the range clamp to t = 0 or T-1.
        """
        sigma_ve = torch.as_tensor(sigma_ve)
        if sigma_ve.device.type == "cpu" and sigma_ve.is_floating_point() and sigma_ve.isnan().any():
            raise ValueError(f"VE sigmas must not be NaN, got {sigma_ve}")
        log_sigmas = -0.5 * self._table(sigma_ve.device, capped=True)  # strictly ascending in t
        log_sigma = torch.log(sigma_ve.to(log_sigmas.dtype)).reshape(-1)
        low = torch.searchsorted(log_sigmas, log_sigma, right=True) - 1
        low = low.clamp(0, self.num_train_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        # Equal endpoints (betas of 0) would give 0 / 0: any t between them has that sigma, take the lower one.
        w = torch.where(hi > lo, (log_sigma - lo) / (hi - lo), torch.zeros_like(lo)).clamp(0, 1)
        return (low + w).reshape(sigma_ve.shape).to(dtype)

    @property
    def ve_sigma_min(self) -> float:
        """VE sigma at t=0, the lower end of the k-diffusion sigma range."""
        return float(self.ve_sigma(0, torch.float64))

    @property
    def ve_sigma_max(self) -> float:
        """VE sigma at t=T-1 where samplers start; finite even with zero terminal SNR (see
        `_sampling_ve_sigma_max`)."""
        return self._ve_sigma_max

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x0) = N(alpha_t x0, sigma_t**2 I) with the given noise (DDPM eq. 4)."""
        alpha = expand_as_batch(self.alpha(t.to(x0.device), x0.dtype), x0)
        sigma = expand_as_batch(self.sigma(t.to(x0.device), x0.dtype), x0)
        return alpha * x0 + sigma * noise

    def posterior_coefficients(
        self, t: Tensor, t_prev: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(c_x0, c_xt, variance) of q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, variance), in float64.

        DDPM eq. 6-7 generalised to any earlier integer step s = t_prev (default t-1; s = -1 is the clean sample,
        alphas_cumprod = 1): with beta_ts = 1 - abar_t / abar_s,
        c_x0 = sqrt(abar_s) beta_ts / (1 - abar_t), c_xt = sqrt(1 - beta_ts) (1 - abar_s) / (1 - abar_t),
        variance = (1 - abar_s) / (1 - abar_t) * beta_ts.
        """
        t = torch.as_tensor(t).long()
        s = t - 1 if t_prev is None else torch.as_tensor(t_prev, device=t.device).long()
        if t.device.type == "cpu" and ((s >= t).any() or (s < -1).any()):
            raise ValueError(f"t_prev must satisfy -1 <= t_prev < t, got t={t}, t_prev={s}")
        dtype = _compute_dtype(t.device)
        abar_t = self.alphas_cumprod_at(t, dtype)
        abar_s = torch.where(s < 0, 1.0, self.alphas_cumprod_at(s.clamp(min=0), dtype))
        beta_ts = 1.0 - abar_t / abar_s
        c_x0 = abar_s.sqrt() * beta_ts / (1.0 - abar_t)
        c_xt = (1.0 - beta_ts).sqrt() * (1.0 - abar_s) / (1.0 - abar_t)
        variance = (1.0 - abar_s) / (1.0 - abar_t) * beta_ts
        return c_x0, c_xt, variance

    def posterior(
        self, x0: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean (like x0) and variance (B,) of q(x_{t_prev} | x_t, x0); see posterior_coefficients."""
        c_x0, c_xt, variance = self.posterior_coefficients(t.to(x0.device), t_prev)
        mean = expand_as_batch(c_x0.to(x0.dtype), x0) * x0 + expand_as_batch(c_xt.to(x0.dtype), x0) * x_t
        return mean, variance.to(x0.dtype)


def _sampling_ve_sigma_max(log_snr: Tensor) -> float:
    """The VE sigma samplers start from: sigma(T-1) itself when finite. With zero terminal SNR it is infinite,
    and only that last entry is capped: at alphas_cumprod = 2**-24 (diffusers' choice) where that lies above
    sigma(T-2), else one more log-sigma step past T-2 (the linear schedule's sigma(998) is ~15,406 > 4096),
    so the sigmas stay strictly increasing in t and `t_from_ve_sigma` stays invertible."""
    last = float(log_snr[-1])
    if math.isfinite(last):
        return math.exp(-0.5 * last)
    cap = math.sqrt((1.0 - MIN_SAMPLING_ALPHAS_CUMPROD) / MIN_SAMPLING_ALPHAS_CUMPROD)
    before = math.exp(-0.5 * float(log_snr[-2]))
    if before < cap:
        return cap
    ratio = math.exp(-0.5 * float(log_snr[-2] - log_snr[-3])) if len(log_snr) > 2 else 2.0
    return before * ratio


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def expand_as_batch(coef: Tensor, like: Tensor) -> Tensor:
    """(B,) or scalar coefficient -> broadcastable against like (B, ...)."""
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def gaussian_noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) of `shape` with like's dtype and device, drawn on the generator's device so a CPU generator
    reproduces the same numbers whatever device the model runs on."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)

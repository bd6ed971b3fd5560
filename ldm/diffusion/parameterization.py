"""What the network predicts, and conversions between its output, x0 and eps.

With x_t = alpha x0 + sigma eps (alpha**2 + sigma**2 = 1):
  eps: out = eps,                          x0 = (x_t - sigma out) / alpha   (Ho et al. 2020)
  x0:  out = x0
  v:   out = v = alpha eps - sigma x0,     x0 = alpha x_t - sigma out       (Salimans & Ho 2022, sec. 4)
  edm: out = F with x0 = c_skip x + c_out F on the VE input x = x_t / alpha, the net seeing c_in x
       (Karras et al. 2022, "Elucidating the Design Space", sec. 5 / Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch

PREDICTION_TYPES = ("eps", "x0", "v", "edm")
EDM_TIME_INPUTS = ("timestep", "c_noise")


@dataclass(frozen=True)
class EDMCoefficients:
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


class EDMPreconditioner:
    """EDM preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, Table 1).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma) / 4, with sd = sigma_data and sigma the VE noise level. `time_input` chooses what the
    network is conditioned on: "timestep" (the discrete-time t, a monotone function of sigma that a
    timestep-embedding UNet already understands) or "c_noise" (EDM's ln(sigma)/4 for continuous-sigma nets).
    """

    def __init__(self, sigma_data: float = 0.5, time_input: str = "timestep"):
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if time_input not in EDM_TIME_INPUTS:
            raise ValueError(f"unknown time_input {time_input!r}; choose one of {EDM_TIME_INPUTS}")
        self.sigma_data = sigma_data
        self.time_input = time_input

    def coefficients(self, sigma: Tensor) -> EDMCoefficients:
        """The four EDM coefficients at VE noise level sigma (any shape)."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).sqrt()
        return EDMCoefficients(
            c_skip=sd2 / (sigma**2 + sd2),
            c_out=sigma * self.sigma_data / norm,
            c_in=1.0 / norm,
            c_noise=sigma.log() / 4,
        )

    def vp_coefficients(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip_vp, c_out, c_in_vp) acting on the VP sample x_t = alpha * x_ve.

        x0 = c_skip_vp x_t + c_out F and the net input is c_in_vp x_t. Written with alpha and the VP sigma
        (multiply numerator and denominator by alpha) so they stay finite at alpha = 0 (zero terminal SNR),
        where the VE sigma is infinite.
        """
        sd2 = self.sigma_data**2
        norm = (sigma**2 + alpha**2 * sd2).sqrt()  # = alpha * sqrt(sigma_ve^2 + sd^2)
        return sd2 * alpha / norm**2, sigma * self.sigma_data / norm, 1.0 / norm


class Parameterization:
    """Round-trippable maps between the network output and (x0, eps) for one prediction type.

    Coefficients come from the schedule at the (integer or fractional) timestep t (B,); they are computed in
    the dtype of the tensors they multiply.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        preconditioner: EDMPreconditioner | None = None,
    ):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTION_TYPES}")
        if prediction == "edm" and preconditioner is None:
            preconditioner = EDMPreconditioner()
        self.schedule = schedule
        self.prediction = prediction
        self.preconditioner = preconditioner

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        t = t.to(like.device)
        return expand_as_batch(self.schedule.alpha(t, like.dtype), like), expand_as_batch(
            self.schedule.sigma(t, like.dtype), like
        )

    def _edm(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha, sigma = self._coefs(t, like)
        return self.preconditioner.vp_coefficients(alpha, sigma)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network should output for x_t = alpha x0 + sigma eps."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        alpha, sigma = self._coefs(t, x0)
        if self.prediction == "v":
            return alpha * eps - sigma * x0
        c_skip, c_out, _ = self._edm(t, x0)
        x_t = alpha * x0 + sigma * eps
        return (x0 - c_skip * x_t) / c_out

    def to_x0(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 implied by the network output at x_t."""
        if self.prediction == "x0":
            return model_out
        if self.prediction == "edm":
            c_skip, c_out, _ = self._edm(t, x_t)
            return c_skip * x_t + c_out * model_out
        alpha, sigma = self._coefs(t, x_t)
        if self.prediction == "eps":
            return (x_t - sigma * model_out) / alpha
        return alpha * x_t - sigma * model_out

    def to_eps(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """eps implied by the network output at x_t."""
        if self.prediction == "eps":
            return model_out
        alpha, sigma = self._coefs(t, x_t)
        if self.prediction == "v":
            return sigma * x_t + alpha * model_out
        return (x_t - alpha * self.to_x0(model_out, x_t, t)) / sigma

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network output that would imply x0 at x_t (inverse of to_x0)."""
        if self.prediction == "x0":
            return x0
        if self.prediction == "edm":
            c_skip, c_out, _ = self._edm(t, x_t)
            return (x0 - c_skip * x_t) / c_out
        alpha, sigma = self._coefs(t, x_t)
        if self.prediction == "eps":
            return (x_t - alpha * x0) / sigma
        return (alpha * x_t - x0) / sigma

    def model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The tensor the network sees: x_t itself, or c_in * x_ve under EDM preconditioning."""
        if self.prediction != "edm":
            return x_t
        return self._edm(t, x_t)[2] * x_t

    def model_time(self, t: Tensor) -> Tensor:
        """The time conditioning the network sees: float t, or EDM's c_noise = ln(sigma_ve) / 4."""
        if self.prediction == "edm" and self.preconditioner.time_input == "c_noise":
            return self.schedule.ve_sigma(t).log() / 4
        return t.float()

"""Per-timestep loss weights for the diffusion objective.

Every weighting below except "none" is defined on the x0-space error |x0_hat - x0|^2 and carried into the space
the network predicts in. Since x0_hat - x0 = k(t)^(1/2) (out - target) for each prediction type (with
x_t = alpha x0 + sigma eps, SNR = alpha^2 / sigma^2):
  eps: x0_hat = (x_t - sigma eps_hat) / alpha      ->  k = sigma^2 / alpha^2 = 1 / SNR
  v:   x0_hat = alpha x_t - sigma v_hat            ->  k = sigma^2 = 1 / (1 + SNR)
  x0:                                              ->  k = 1
  edm: x0_hat = c_skip x + c_out F_hat             ->  k = c_out^2 = sd^2 / (1 + sd^2 SNR)
a weight w_x0 on the x0-space error equals w_x0 * k on the prediction-space error.

min_snr (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") truncates the x0-space
  weight at gamma. Hang et al.'s w_x0 = min(SNR, gamma) is 0 at SNR = 0, the last step of a zero-terminal-SNR
  schedule, which is the step that schedule exists to train (Lin et al. 2023). So only eps keeps it; the other
  types truncate SNR + 1 instead, w_x0 = min(SNR + 1, gamma), as diffusers' trainers do for v ("add one to SNR"):
  eps: min(SNR, gamma) / SNR = min(1, gamma / SNR)    (1 at SNR = 0 already; eps cannot run at SNR = 0 anyway)
  v:   min(SNR + 1, gamma) / (SNR + 1) = min(1, gamma / (SNR + 1))    the eps rule on v's own scale: 1 at SNR = 0
  x0:  min(SNR + 1, gamma)                                            the same x0-space weight as v, so that
  edm: min(SNR + 1, gamma) c_out^2                                    switching the target leaves the loss alone
  Both agree with Hang et al. where SNR >= gamma (the low-noise steps the truncation is about); below, the
  high-noise steps get weight 1 in v space rather than SNR / (SNR + 1) -> 0.
edm (Karras et al. 2022, eq. 8 / Table 1): w_x0 = lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 with the VE
  sigma^2 = 1 / SNR, i.e. lambda = 1 / sd^2 + SNR (finite at SNR = 0); with EDM preconditioning lambda c_out^2 = 1.
none: weight 1 on the prediction-space error (the "simple" DDPM loss of Ho et al. 2020).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.parameterization import PREDICTION_TYPES

WEIGHTINGS = ("none", "min_snr", "edm")


def x0_error_scale(snr: Tensor, prediction: str, sigma_data: float = 0.5) -> Tensor:
    """k(SNR) with |x0_hat - x0|^2 = k |out - target|^2 (see the module docstring)."""
    if prediction == "eps":
        return 1.0 / snr
    if prediction == "v":
        return 1.0 / (1.0 + snr)
    if prediction == "x0":
        return torch.ones_like(snr)
    if prediction == "edm":
        return sigma_data**2 / (1.0 + sigma_data**2 * snr)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTION_TYPES}")


def edm_lambda(snr: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 written with SNR = 1 / sigma^2."""
    return 1.0 / sigma_data**2 + snr


def loss_weight(
    weighting: str, snr: Tensor, prediction: str, min_snr_gamma: float = 5.0, sigma_data: float = 0.5
) -> Tensor:
    """Weight (same shape as snr) for the prediction-space loss of `prediction` under `weighting`."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    scale = x0_error_scale(snr, prediction, sigma_data)
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting == "edm":
        return edm_lambda(snr, sigma_data) * scale
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
    if prediction == "eps":
        # min(SNR, gamma) / SNR without 0/0 at SNR = 0.
        return (min_snr_gamma / snr).clamp(max=1.0)
    return (snr + 1.0).clamp(max=min_snr_gamma) * scale

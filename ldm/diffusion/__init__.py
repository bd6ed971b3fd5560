"""Diffusion math (schedules, parameterizations, losses, samplers, guidance) in plain PyTorch."""

from ldm.diffusion.guidance import Autoguidance, ClassifierFreeGuidance, GuidanceInterval
from ldm.diffusion.objective import Denoiser, DiffusionObjective, denoiser
from ldm.diffusion.parameterization import EDMPreconditioner, Parameterization
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import NoiseSchedule, rescale_zero_terminal_snr, sampling_timesteps

__all__ = [
    "SAMPLERS",
    "Autoguidance",
    "ClassifierFreeGuidance",
    "GuidanceInterval",
    "Denoiser",
    "DiffusionObjective",
    "EDMPreconditioner",
    "NoiseSchedule",
    "Parameterization",
    "denoiser",
    "rescale_zero_terminal_snr",
    "sample",
    "sampling_timesteps",
]

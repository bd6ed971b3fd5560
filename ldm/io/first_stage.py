"""The frozen first stage of stage 2 built from files: a stage-1 export (``first_stage=export``, ``from_export``) or
``first_stage=pretrained``: a public autoencoder (SD's kl-f8, ``sd-vae-ft-mse``, ...) instead
of a stage-1 export, as most latent diffusion work does (Rombach et al. 2022 reuse one first stage across
all their LDMs)."""

from __future__ import annotations

import math
from pathlib import Path

from ldm.errors import ConfigError
from ldm.io.compvis import load_pretrained_autoencoder
from ldm.io.export import load_autoencoder
from ldm.model.first_stage import FirstStage

SD_SCALE_FACTOR = 0.18215  # 1/std of SD-1.x/2.x kl-f8 latents on its training data (CompVis configs)


def pretrained_first_stage(
    path: str | None,
    latent_channels: int | None = None,
    scale_factor: float | None = None,
    sample_posterior: bool = True,
    original_config: str | None = None,
) -> FirstStage:
    """A frozen FirstStage from a CompVis/SD single file (``.safetensors``; ``.ckpt`` read with
    ``weights_only=True``) or a diffusers AutoencoderKL folder (or a pipeline folder with ``vae/``).

    scale_factor: None = what the source states (diffusers ``scaling_factor``, the checkpoint's
        ``scale_factor`` tensor, or ``model.params.scale_factor`` of ``original_config``).
    latent_channels: what the config promised the UNet; checked against the loaded weights.
    original_config: the CompVis yaml of the checkpoint; without it the architecture is read off the shapes.
    """
    if path is None or str(path) in ("", "None", "null"):
        raise ConfigError(
            "first_stage=pretrained needs first_stage.path: a CompVis/SD .safetensors (or .ckpt) file, or a "
            "diffusers AutoencoderKL folder"
        )
    if not Path(path).exists():
        raise ConfigError(f"first_stage.path={path} does not exist")
    loaded = load_pretrained_autoencoder(path, original_config)
    autoencoder = loaded.autoencoder
    if latent_channels is not None and int(latent_channels) != autoencoder.embed_dim:
        raise ConfigError(
            f"first_stage.latent_channels={latent_channels} but the autoencoder at {path} has "
            f"{autoencoder.embed_dim} latent channels: set first_stage.latent_channels={autoencoder.embed_dim}"
        )
    if loaded.shift_factor not in (None, 0.0):
        raise ConfigError(
            f"the autoencoder at {path} shifts its latents (shift_factor={loaded.shift_factor}); our first "
            "stage only scales them, so training on it would not match its published latent space"
        )
    if scale_factor is None:
        scale_factor = loaded.scale_factor
    if scale_factor is None or not math.isfinite(float(scale_factor)) or float(scale_factor) <= 0:
        raise ConfigError(
            f"no latent scale factor for {path}: the source states none; set first_stage.scale_factor "
            f"(e.g. {SD_SCALE_FACTOR} for the SD-1.x/2.x kl-f8 autoencoder)"
        )
    return FirstStage(autoencoder, float(scale_factor), sample_posterior)


def from_export(
    path: str,
    latent_channels: int | None = None,
    scale_factor: float | None = None,
    sample_posterior: bool = True,
) -> FirstStage:
    """``first_stage=export``: a stage-1 export folder, checked against the config. ``scale_factor=None`` means
    1/std of the latents measured on the training data at the end of stage 1 (scale_by_std, as CompVis), read
    from the export."""
    autoencoder, meta = load_autoencoder(path)
    if latent_channels is not None and int(latent_channels) != int(autoencoder.embed_dim):
        raise ConfigError(
            f"first_stage.latent_channels={latent_channels} but the export at {path} has "
            f"{autoencoder.embed_dim} latent channels; remove the override or use a matching export"
        )
    if scale_factor is None:
        std = meta.get("latent_std")
        if not std or not math.isfinite(std):
            raise ConfigError(f"the export at {path} records no latent std: set first_stage.scale_factor")
        scale_factor = 1.0 / std
    return FirstStage(autoencoder, scale_factor, sample_posterior)

"""ldm: a config-driven research framework for latent diffusion models (Lightning + Hydra)."""

__version__ = "0.1.0"

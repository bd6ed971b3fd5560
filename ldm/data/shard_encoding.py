"""Precomputed latents and text embeddings in shards (``ldm-prepare encode=true``), and their keys.

The frozen first stage gives the same posterior for an image every epoch and a frozen text encoder the same
tokens for a caption, so ``ldm-prepare`` runs both once and stores the posterior's mean and std (training still
samples ``mean + std * noise``) and the caption's tokens. The shards record a fingerprint of each network's
weights (:func:`ldm.io.checkpoint_io.tensors_hash`, as checkpoints do) and the image geometry they were encoded
at; a training run whose first stage, text encoder or geometry differs is refused (:func:`check_encoded`), never
silently trained on another network's latents.

Latents are stored as float32 by default: the posterior std of a well-trained KL autoencoder is often below
float16's normal range (6e-5) and would round to a few bits or to zero, and float32 makes training from shards
reproduce encoding on the fly exactly. ``latent_dtype: float16`` halves the size where that does not matter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.io.checkpoint_io import tensors_hash

LATENT_DTYPES = ("float32", "float16")


def first_stage_fingerprint(first_stage: nn.Module) -> str:
    """The autoencoder's weights (the scale factor is applied at training time, so it is not part of it)."""
    return tensors_hash(first_stage.autoencoder.state_dict())


def frozen_text_encoder(conditioner: nn.Module | None) -> nn.Module | None:
    """The conditioner's frozen text encoder, or None; a trained one cannot be precomputed."""
    from ldm.nets.conditioners import FrozenTextEncoder

    encoders = [e for e in getattr(conditioner, "embedders", []) if isinstance(e, FrozenTextEncoder)]
    if len(encoders) > 1:
        raise ValueError(f"the conditioner has {len(encoders)} text encoders; precomputed embeddings hold one")
    if encoders and not encoders[0].freeze:
        raise ValueError("the conditioner's text encoder trains (freeze=false): its embeddings cannot be "
                         "precomputed; use a frozen encoder or encode=false")
    return encoders[0] if encoders else None


def text_encoder_fingerprint(encoder: nn.Module) -> str:
    """Weights plus what shapes the tokens: the same weights at another max_length or layer differ."""
    settings = {"max_length": torch.tensor(int(encoder.max_length)),
                "layer_penultimate": torch.tensor(int(encoder.layer == "penultimate"))}
    return tensors_hash({**encoder.transformer.state_dict(), **{f"__{k}": v for k, v in settings.items()}})


def encoding_pixels(transform, image) -> torch.Tensor:
    """A decoded PIL image as training sees it without random crop or flip (``transform``: an
    :class:`ldm.data.image_files.ImageTransform`): (C, S, S) in [-1, 1]."""
    return transform(image, np.random.default_rng(0))


class ShardEncoder:
    """Adds latent moments (and caption embeddings) to raw samples, in batches, on ``device``.

    Args:
        first_stage: a :class:`ldm.model.FirstStage` (only ``encode_moments`` and ``autoencoder``).
        text_encoder: a frozen :class:`ldm.nets.conditioners.FrozenTextEncoder`, or None.
        image_size, mode: the geometry training will use (shorter side resized, centre crop).
        flips: also encode the mirrored image (training with random_flip picks one per sample and epoch).
        latent_dtype: ``float32`` or ``float16`` (see the module docstring).
        embedding_dtype: of the caption embeddings, ``float32`` or ``float16`` (half the size: 118 KB instead of
            236 KB a sample for CLIP-L's 77 x 768; training reads them back as float32); None: ``latent_dtype``.
        device: where both networks run (``cuda:<local rank>`` under torchrun).
    """

    def __init__(self, first_stage: nn.Module, text_encoder: nn.Module | None, image_size: int, mode: str = "RGB",
                 flips: bool = True, latent_dtype: str = "float32", device: str = "cpu",
                 embedding_dtype: str | None = None) -> None:
        from ldm.data.image_files import ImageTransform

        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"encode.latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
        embedding_dtype = embedding_dtype or latent_dtype
        if embedding_dtype not in LATENT_DTYPES:
            raise ValueError(f"encode.embedding_dtype must be one of {LATENT_DTYPES}, got {embedding_dtype!r}")
        self.device = torch.device(device)
        self.first_stage = first_stage.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval() if text_encoder is not None else None
        self.transform = ImageTransform(image_size, mode)
        self.flips = flips
        self.dtype = np.dtype(latent_dtype)
        self.embedding_dtype = np.dtype(embedding_dtype)

    def settings(self) -> dict[str, Any]:
        """What the shards record and training checks (see :func:`check_encoded`)."""
        text = None
        if self.text_encoder is not None:
            text = {"fingerprint": text_encoder_fingerprint(self.text_encoder), "dim": int(self.text_encoder.output_dim),
                    "max_length": int(self.text_encoder.max_length), "layer": self.text_encoder.layer}
            if self.embedding_dtype != self.dtype:  # only then: shards written before the option keep their hash
                text["embedding_dtype"] = self.embedding_dtype.name
        return {"image_size": self.transform.image_size, "mode": self.transform.mode, "flips": self.flips,
                "latent_dtype": self.dtype.name, "latent_channels": int(self.first_stage.latent_channels),
                "first_stage": first_stage_fingerprint(self.first_stage), "text_encoder": text}

    @torch.no_grad()
    def encode(self, samples: list[dict[str, Any]], images: list[torch.Tensor] | torch.Tensor) -> None:
        """Adds the latent fields (and ``caption_embedding``) to ``samples`` in place; ``images``: their
        :func:`encoding_pixels`, a list or one (B, C, S, S) batch."""
        batch = images if isinstance(images, torch.Tensor) else torch.stack(images)
        batch = batch.to(self.device, non_blocking=True)  # (B, C, S, S)
        variants = {"": batch, "_flip": batch.flip(-1)} if self.flips else {"": batch}
        for suffix, pixels in variants.items():
            mean, std = self.first_stage.encode_moments(pixels)
            for sample, m, s in zip(samples, mean.float().cpu().numpy(), std.float().cpu().numpy()):
                sample[f"latent_mean{suffix}"] = m.astype(self.dtype)
                sample[f"latent_std{suffix}"] = s.astype(self.dtype)
        if self.text_encoder is not None:
            embeddings = self.text_encoder._run_encoder([s["caption"] for s in samples])  # (B, L, D)
            for sample, e in zip(samples, embeddings.float().cpu().numpy()):
                sample["caption_embedding"] = e.astype(self.embedding_dtype)


def check_encoded(encode: dict[str, Any], first_stage: nn.Module, conditioner: nn.Module | None,
                  image_size: int, mode: str, random_crop: bool, random_flip: bool, where: str) -> bool:
    """Refuse shards encoded by other networks or at another geometry than this training run's.

    Returns whether the run should read the precomputed caption embeddings (the shards hold them and the
    conditioner has the frozen text encoder they were made with)."""
    fix = ("run `ldm-prepare encode=true` again with this run's first_stage.path (and cond) into a new output, or "
           "train from the images with data.use_latents=false")
    if first_stage_fingerprint(first_stage) != encode["first_stage"]:
        raise ValueError(f"the latents in {where} were encoded by another first stage (weights fingerprint "
                         f"{encode['first_stage'][:12]}, this run's is {first_stage_fingerprint(first_stage)[:12]}): {fix}")
    for name, mine, theirs in (("image_size", image_size, encode["image_size"]), ("mode", mode, encode["mode"])):
        if mine != theirs:
            raise ValueError(f"the latents in {where} were encoded at {name}={theirs}, data.{name}={mine}: set "
                             f"data.{name}={theirs}, or {fix}")
    if random_crop:
        raise ValueError(f"the latents in {where} are of centre crops: set data.random_crop=false, or train from "
                         "the images with data.use_latents=false")
    if random_flip and not encode["flips"]:
        raise ValueError(f"the latents in {where} were encoded without mirrored copies: set data.random_flip=false, "
                         f"or {fix} (encode.flips=true)")
    encoder = frozen_text_encoder(conditioner)
    text = encode.get("text_encoder")
    if encoder is None or text is None:
        return False
    if text_encoder_fingerprint(encoder) != text["fingerprint"]:
        raise ValueError(f"the caption embeddings in {where} were made by another text encoder (or max_length/layer) "
                         f"than this run's cond: {fix}")
    return True

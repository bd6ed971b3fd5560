"""Vector-quantised first stage (van den Oord et al. 2017, VQ-VAE; Esser et al. 2021, VQGAN).

Keys follow CompVis's ``VQModel``: ``encoder.*``, ``quant_conv``, ``quantize.embedding.weight``,
``post_quant_conv``, ``decoder.*``. As in CompVis's ``VQModelInterface``, the diffusion model works
on the continuous pre-quantisation latent and ``decode`` quantises before decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nets.autoencoder import EncoderDecoderConfig, check_image_input


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser with a straight-through gradient (van den Oord et al. 2017).

    loss = ||sg[z] - e||^2 (moves the codebook) + beta * ||z - sg[e]||^2 (commits the encoder).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        if n_embed < 2 or embed_dim < 1:
            raise ValueError(f"need n_embed >= 2 and embed_dim >= 1, got {n_embed} and {embed_dim}")
        if beta < 0:
            raise ValueError(f"commitment beta must be >= 0, got {beta}")
        self.n_embed = int(n_embed)
        self.embed_dim = int(embed_dim)
        self.beta = float(beta)
        self.embedding = nn.Embedding(self.n_embed, self.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_embed, 1.0 / self.n_embed)

    def codes(self, z: Tensor) -> Tensor:
        """Index of the nearest codebook entry for every latent vector: (B, C, H, W) -> (B, H, W)."""
        b, c, h, w = z.shape
        if c != self.embed_dim:
            raise ValueError(f"latent has {c} channels but the codebook has embed_dim={self.embed_dim}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C)
        codebook = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, without materialising (N, K, C)
        distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * flat @ codebook.t()
        return distances.argmin(dim=1).reshape(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for indices (B, H, W) -> (B, C, H, W)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Quantise ``z`` (B, C, H, W); returns (z_q with straight-through grad, vq loss, info)."""
        indices = self.codes(z)
        z_q = self.lookup(indices)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        loss = codebook_loss + self.beta * commitment_loss
        # Straight-through: the forward value is z_q, the gradient w.r.t. z is the identity.
        z_q = z + (z_q - z).detach()
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).to(z.dtype)
        probs = counts / counts.sum()
        entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
        info = {
            "perplexity": torch.exp(entropy),
            "usage": (counts > 0).to(z.dtype).mean(),
            "indices": indices,
        }
        return z_q, loss, info


class DeterministicPosterior:
    """Point-mass posterior over the pre-quantisation latent, with the Gaussian posterior's interface."""

    def __init__(self, latent: Tensor):
        self.mean = latent
        self.std = torch.zeros_like(latent)
        self.var = torch.zeros_like(latent)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.mean

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: Any = None) -> Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)


class VQModel(nn.Module):
    """VQ-regularised autoencoder: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(
        self,
        ddconfig: EncoderDecoderConfig | Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
    ):
        super().__init__()
        config = EncoderDecoderConfig.from_mapping(ddconfig)
        if config.double_z:
            raise ValueError(
                "VQModel needs ddconfig.double_z=false (the encoder predicts one latent, not moments)"
            )
        self.config = config
        self.embed_dim = int(embed_dim)
        self.downsample_factor = 2 ** (len(config.ch_mult) - 1)
        self.encoder = config.encoder()
        self.decoder = config.decoder()
        self.quant_conv = nn.Conv2d(config.z_channels, self.embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, self.embed_dim, beta)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, config.z_channels, 1)

    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, self.config.in_channels, self.downsample_factor)

    def encode(self, x: Tensor) -> DeterministicPosterior:
        self._check_input(x)
        return DeterministicPosterior(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor, force_not_quantize: bool = False) -> Tensor:
        if not force_not_quantize:
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Training pass: (reconstruction, vq loss, info with perplexity / usage / indices)."""
        z = self.encode(x).mean
        z_q, vq_loss, info = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q)), vq_loss, info

    def get_last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

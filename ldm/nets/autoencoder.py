"""Convolutional autoencoder of the first stage (Esser et al. 2021; Rombach et al. 2022, sec. 3.1).

The architecture and every state-dict key follow CompVis/latent-diffusion's ``AutoencoderKL`` (the
Stable Diffusion first stage), so public checkpoints such as ``sd-vae-ft-mse`` load without renaming:
``encoder.down.{i}.block.{j}.*``, ``encoder.down.{i}.downsample.conv``, ``encoder.mid.block_1``,
``encoder.mid.attn_1.{q,k,v,proj_out}``, ``quant_conv``, ``post_quant_conv``, ``decoder.up.{i}.*``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    if channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm needs channels divisible by norm_num_groups, got {channels} channels and "
            f"{num_groups} groups: choose ch (times every ch_mult) as a multiple of norm_num_groups"
        )
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm-SiLU-conv twice); a 1x1 ``nin_shortcut`` changes width."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_num_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (CompVis ``AttnBlock``)."""

    def __init__(self, channels: int, norm_num_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, H*W, C): one head over all pixels
            return t.reshape(b, 1, c, height * width).transpose(2, 3)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padding only right/bottom (as CompVis) so pretrained weights see the same grid."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), each followed by ``attn`` where the level has attention."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _DownLevel(_Level):
    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], downsample: Downsample | None):
        super().__init__(blocks, attns)
        self.downsample = downsample

    def forward(self, h: Tensor) -> Tensor:
        h = self.run_blocks(h)
        return h if self.downsample is None else self.downsample(h)


class _UpLevel(_Level):
    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], upsample: Upsample | None):
        super().__init__(blocks, attns)
        self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        h = self.run_blocks(h)
        return h if self.upsample is None else self.upsample(h)


class _MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, use_attn: bool, norm_num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_num_groups)
        self.attn_1 = AttnBlock(channels, norm_num_groups) if use_attn else None
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_num_groups)

    def forward(self, h: Tensor) -> Tensor:
        h = self.block_1(h)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h)


def _validate_levels(ch: int, ch_mult: Sequence[int], num_res_blocks: int) -> tuple[int, ...]:
    ch_mult = tuple(int(m) for m in ch_mult)
    if len(ch_mult) == 0 or min(ch_mult) < 1:
        raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {list(ch_mult)}")
    if ch < 1 or num_res_blocks < 1:
        raise ValueError(f"ch and num_res_blocks must be >= 1, got ch={ch}, num_res_blocks={num_res_blocks}")
    return ch_mult


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent moments (B, 2*z_channels or z_channels, H/f, W/f).

    f = 2**(len(ch_mult)-1); attention is applied at the resolutions listed in ``attn_resolutions``
    (measured against ``resolution``, the nominal training image size).
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        in_channels: int = 3,
        resolution: int = 256,
        dropout: float = 0.0,
        double_z: bool = True,
        use_mid_attn: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        ch_mult = _validate_levels(ch, ch_mult, num_res_blocks)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        current_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[level], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            is_last = level == len(ch_mult) - 1
            self.down.append(_DownLevel(blocks, attns, None if is_last else Downsample(block_in)))
            if not is_last:
                current_res //= 2
        self.mid = _MidBlock(block_in, dropout, use_mid_attn, norm_num_groups)
        self.norm_out = group_norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); mirror of :class:`Encoder`.

    ``up`` is indexed like ``down`` (``up[0]`` is the full-resolution level) although it runs in
    reverse order; CompVis stores it that way, so the keys of pretrained decoders line up.
    """

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int = 256,
        dropout: float = 0.0,
        use_mid_attn: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        ch_mult = _validate_levels(ch, ch_mult, num_res_blocks)
        block_in = ch * ch_mult[-1]
        current_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _MidBlock(block_in, dropout, use_mid_attn, norm_num_groups)
        levels: list[_UpLevel] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            levels.insert(0, _UpLevel(blocks, attns, None if level == 0 else Upsample(block_in)))
            if level != 0:
                current_res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class EncoderDecoderConfig:
    """The CompVis ``ddconfig``: shared by encoder and decoder (Hydra passes it as a plain mapping)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    attn_resolutions: tuple[int, ...] = field(default_factory=tuple)
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    dropout: float = 0.0
    double_z: bool = True
    use_mid_attn: bool = True
    norm_num_groups: int = 32

    @classmethod
    def from_mapping(cls, ddconfig: EncoderDecoderConfig | Mapping[str, Any]) -> EncoderDecoderConfig:
        if isinstance(ddconfig, cls):
            return ddconfig
        if not isinstance(ddconfig, Mapping):
            raise ValueError(
                f"ddconfig must be a mapping of encoder/decoder settings, got {type(ddconfig).__name__}"
            )
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, ddconfig)) - valid)
        if unknown:
            raise ValueError(f"unknown ddconfig keys {unknown}; valid keys are {sorted(valid)}")
        values = dict(ddconfig)
        for key in ("ch_mult", "attn_resolutions"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def encoder(self) -> Encoder:
        kwargs = asdict(self)
        kwargs.pop("out_ch")
        return Encoder(**kwargs)

    def decoder(self) -> Decoder:
        kwargs = asdict(self)
        kwargs.pop("in_channels")
        kwargs.pop("double_z")
        return Decoder(**kwargs)


def check_image_input(x: Tensor, in_channels: int, downsample_factor: int) -> None:
    """Images must be (B, in_channels, H, W) with H and W divisible by the downsample factor."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected images (B, {in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[-1] % downsample_factor or x.shape[-2] % downsample_factor:
        raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the downsample factor {downsample_factor}")


class DiagonalGaussianDistribution:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) parameterised by the encoder's 2*C output channels.

    ``logvar`` is clamped to [-30, 20] as in CompVis, so an untrained encoder cannot overflow ``exp``.
    """

    def __init__(self, parameters: Tensor):
        if parameters.dim() != 4 or parameters.shape[1] % 2 != 0:
            raise ValueError(f"expected (B, 2*C, H, W) moments, got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) per sample, summed over (C, H, W); ``other=None`` means N(0, I). Shape (B,)."""
        dims = (1, 2, 3)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``sample`` under the posterior, summed over ``dims``."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=tuple(dims)
        )


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022, sec. 3.1): x -> q(z|x) -> z -> x_hat.

    ``quant_conv`` maps the encoder's 2*z_channels moments to 2*embed_dim; ``post_quant_conv`` maps
    a latent back to z_channels (the names are CompVis's, shared with the VQ model).
    """

    def __init__(self, ddconfig: EncoderDecoderConfig | Mapping[str, Any], embed_dim: int):
        super().__init__()
        config = EncoderDecoderConfig.from_mapping(ddconfig)
        if not config.double_z:
            raise ValueError(
                "AutoencoderKL needs ddconfig.double_z=true (the encoder predicts mean and logvar)"
            )
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.config = config
        self.embed_dim = int(embed_dim)
        self.downsample_factor = 2 ** (len(config.ch_mult) - 1)
        self.encoder = config.encoder()
        self.decoder = config.decoder()
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, config.z_channels, 1)

    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, self.config.in_channels, self.downsample_factor)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        self._check_input(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> Tensor:
        """Weight the adaptive GAN weight is computed on (Esser et al. 2021, eq. 7)."""
        return self.decoder.conv_out.weight

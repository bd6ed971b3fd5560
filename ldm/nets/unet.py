"""The denoising UNet of latent diffusion (Rombach et al. 2022), a clean re-write of the CompVis /
Stable Diffusion `UNetModel` (itself the ADM UNet of Dhariwal & Nichol 2021 with SpatialTransformer
cross-attention). Module names follow that layout, so SD-1.x/2.x `model.diffusion_model.*` weights
load without renaming: `time_embed`, `label_emb`, `input_blocks`, `middle_block`, `output_blocks`,
`out`; ResBlocks with `in_layers`/`emb_layers`/`out_layers`/`skip_connection`; `op`/`conv` resamplers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nets.attention import SpatialTransformer, group_norm
from ldm.nets.backbone import check_denoiser_inputs


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of (B,) timesteps -> (B, dim), laid out [cos | sin]
    with frequencies max_period^(-i/half), exactly as CompVis (diffusers: flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


@dataclass
class TransformerSpec:
    """Where the UNet gets SpatialTransformers and what they look like.

    attention_resolutions: downsample rates (1 = full latent resolution, 2 = after one downsample, ...)
        at which every ResBlock is followed by a transformer, as in CompVis configs ([4, 2, 1] for SD).
    num_heads / num_head_channels: set exactly one; the other is derived per level from the channels
        (SD-1.x: num_heads=8; SD-2.x: num_head_channels=64). -1 means unset, as in CompVis configs.
    context_dim: width of the cross-attention context tokens; None for self-attention only.
    use_linear_in_transformer: linear proj_in/proj_out (SD-2.x) instead of 1x1 convolutions (SD-1.x).
    """

    attention_resolutions: Sequence[int] = (4, 2, 1)
    num_heads: int | None = None
    num_head_channels: int | None = None
    transformer_depth: int = 1
    context_dim: int | None = None
    use_linear_in_transformer: bool = False

    def __post_init__(self) -> None:
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.num_heads = None if self.num_heads in (None, -1) else int(self.num_heads)
        self.num_head_channels = None if self.num_head_channels in (None, -1) else int(self.num_head_channels)
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError(
                "Set exactly one of num_heads (e.g. 8, SD-1.x) or num_head_channels (e.g. 64, SD-2.x); "
                f"got num_heads={self.num_heads}, num_head_channels={self.num_head_channels}."
            )
        if self.transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {self.transformer_depth}.")

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) for a transformer on `channels` channels."""
        per_head = self.num_head_channels or channels // self.num_heads
        if channels % per_head:
            raise ValueError(f"{channels} channels cannot be split into heads of {per_head} channels.")
        return channels // per_head, per_head


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution named `conv`."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 convolution, or by average pooling; either way named `op`."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020; Dhariwal & Nichol 2021).

    use_scale_shift_norm: the embedding modulates the second GroupNorm as (1 + scale) * norm(h) + shift
        (AdaGN) instead of being added to h. up/down: the block also resamples by 2 (BigGAN style).
    """

    def __init__(
        self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
        use_scale_shift_norm: bool = False, up: bool = False, down: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.gradient_checkpointing = gradient_checkpointing
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, use_conv=False), Upsample(channels, use_conv=False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, use_conv=False), Downsample(channels, use_conv=False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        # Zero last conv: each block starts as the identity, which stabilises deep UNets early on.
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C', 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    """Timestep- and condition-aware UNet: eps (or v / x0) prediction network of latent diffusion.

    Args:
        in_channels: input channels, including any channels the caller concatenates (inpainting mask, ...).
        out_channels: output channels (the latent channels).
        model_channels: base width; level i has model_channels * channel_mult[i] channels.
        channel_mult: width multiplier per resolution level; one x2 downsample between levels.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        transformer: SpatialTransformer layout (TransformerSpec or a mapping of its fields); None for a
            purely convolutional UNet.
        use_scale_shift_norm: AdaGN timestep conditioning in ResBlocks.
        resblock_updown: resample with up/down ResBlocks instead of Upsample/Downsample.
        dropout: dropout inside ResBlocks and transformers.
        gradient_checkpointing: recompute ResBlock/transformer activations in backward to save memory.
        num_classes: class-conditional via `label_emb = nn.Embedding(num_classes, 4 * model_channels)`
            added to the time embedding; `y` is then (B,) long.
        adm_in_channels: vector-conditional via an MLP `label_emb` (SDXL's "sequential"); `y` is (B, D).
        context_dim: cross-attention width, given by the model's conditioner (``ldm.nets.backbone``); it fills
            the TransformerSpec's context_dim (which must then be unset or equal).
    """

    # The blocks FSDP shards as one unit each (ldm.nets.backbone).
    fsdp_units = ("ResBlock", "SpatialTransformer")

    def __init__(
        self, in_channels: int, out_channels: int, model_channels: int, channel_mult: Sequence[int],
        num_res_blocks: int, transformer: TransformerSpec | Mapping | None = None,
        use_scale_shift_norm: bool = False, resblock_updown: bool = False, dropout: float = 0.0,
        gradient_checkpointing: bool = False, num_classes: int | None = None, adm_in_channels: int | None = None,
        context_dim: int | None = None,
    ):
        super().__init__()
        if isinstance(transformer, Mapping):
            transformer = TransformerSpec(**transformer)
        if context_dim is not None:
            if transformer is None:
                raise ValueError(f"context_dim={context_dim} needs cross-attention: give the UNet a transformer spec.")
            if transformer.context_dim not in (None, context_dim):
                raise ValueError(f"context_dim={context_dim} but transformer.context_dim={transformer.context_dim}.")
            transformer = dataclasses.replace(transformer, context_dim=int(context_dim))
        if num_classes is not None and adm_in_channels is not None:
            raise ValueError("Use either num_classes (label y) or adm_in_channels (vector y), not both.")
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError(f"Need num_res_blocks >= 1 and a non-empty channel_mult; got {num_res_blocks}, {channel_mult}.")
        channel_mult = tuple(int(m) for m in channel_mult)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.channel_mult = model_channels, channel_mult
        self.num_classes, self.adm_in_channels = num_classes, adm_in_channels
        self.context_dim = transformer.context_dim if transformer is not None else None
        self.transformer_spec = transformer
        self._block_kwargs = dict(
            dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, gradient_checkpointing=gradient_checkpointing
        )
        self._gradient_checkpointing = gradient_checkpointing

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
            )

        # Down path; skip_channels records the output width of every input block for the up path.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, out_channels=mult * model_channels, **self._block_kwargs)]
                ch = mult * model_channels
                layers += self._attention(ch, ds)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    ResBlock(ch, time_embed_dim, out_channels=ch, down=True, **self._block_kwargs)
                    if resblock_updown else Downsample(ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, **self._block_kwargs),
            *self._attention(ch, ds, always=True),
            ResBlock(ch, time_embed_dim, **self._block_kwargs),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_embed_dim, out_channels=model_channels * mult,
                                   **self._block_kwargs)]
                ch = model_channels * mult
                layers += self._attention(ch, ds)
                if level and i == num_res_blocks:
                    up = (
                        ResBlock(ch, time_embed_dim, out_channels=ch, up=True, **self._block_kwargs)
                        if resblock_updown else Upsample(ch)
                    )
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _attention(self, channels: int, ds: int, always: bool = False) -> list[nn.Module]:
        spec = self.transformer_spec
        if spec is None or not (always or ds in spec.attention_resolutions):
            return []
        heads, dim_head = spec.heads_and_dim(channels)
        return [SpatialTransformer(
            channels, heads, dim_head, depth=spec.transformer_depth, context_dim=spec.context_dim,
            dropout=self._block_kwargs["dropout"], use_linear=spec.use_linear_in_transformer,
            gradient_checkpointing=self._gradient_checkpointing,
        )]

    @property
    def downsample_factor(self) -> int:
        """Input height/width must be divisible by this."""
        return 2 ** (len(self.channel_mult) - 1)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
        y: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,) float or long, context (B, L, context_dim),
        y (B,) labels or (B, adm_in_channels), context_mask (B, L) bool -> (B, out_channels, H, W)."""
        self._check_inputs(x, timesteps, context, y)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h.type(x.dtype))

    def _check_inputs(self, x, timesteps, context, y) -> None:
        check_denoiser_inputs("UNet", x, timesteps, context, y, in_channels=self.in_channels,
                              context_dim=self.context_dim, num_classes=self.num_classes,
                              adm_in_channels=self.adm_in_channels)
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"Height and width {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor}.")

"""Transformer blocks of the latent-diffusion UNet (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.3).

Module and parameter names follow CompVis/latent-diffusion `ldm/modules/attention.py` so that
Stable Diffusion checkpoints load: `to_q/to_k/to_v/to_out.0`, `ff.net.0.proj/ff.net.2`,
`norm1/2/3`, `proj_in/proj_out`, `transformer_blocks.N`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups, as everywhere in the CompVis UNet."""
    if channels % 32 != 0:
        raise ValueError(f"GroupNorm uses 32 groups, so channel counts must be multiples of 32; got {channels}.")
    return GroupNorm32(32, channels, eps=eps)


class GroupNorm32(nn.GroupNorm):
    """Normalises in float32: group statistics in fp16/bf16 are too coarse (CompVis does the same). The affine
    parameters too: under FSDP's bf16 policy they arrive in bf16, which the CPU kernel refuses beside fp32 input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention, Vaswani et al. 2017; keys/values come from `context` when given.

    mask: optional key padding mask (B, L) with True where a context token may be attended to.
    """

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        batch, n_query, _ = x.shape  # (B, N, C)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, L, H*D) -> (B, H, L, D)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if mask is not None:
            if mask.shape != (batch, context.shape[1]):
                raise ValueError(
                    f"Key padding mask must have shape (B, L) = {(batch, context.shape[1])}, got {tuple(mask.shape)}."
                )
            mask = mask.to(device=x.device, dtype=torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise ValueError("Key padding mask hides every token of some sample; keep at least one True per row.")
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(batch, n_query, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit, Shazeer 2020 ("GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input layer; `net.0.proj` and `net.2` as in CompVis."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on `context`, GEGLU feed-forward.

    Without `context` the second attention attends to `x` itself (CompVis behaviour).
    """

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Recomputes activations in backward instead of storing them: memory for compute.
            return checkpoint(self._forward, x, context, mask, use_reentrant=False)
        return self._forward(x, context, mask)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context, mask=mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual connection around it.

    (B, C, H, W) -> GroupNorm -> proj_in -> (B, H*W, inner) -> blocks -> proj_out -> + input.
    proj_in/proj_out are 1x1 convolutions (SD-1.x) or linear layers (SD-2.x, `use_linear`).
    proj_out starts at zero so every transformer starts as the identity map.
    """

    def __init__(
        self, in_channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
        dropout: float = 0.0, use_linear: bool = False, gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"transformer depth must be >= 1, got {depth}.")
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, gradient_checkpointing)
            for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if self.use_linear:
            h = self.proj_in(h.flatten(2).transpose(1, 2))  # (B, H*W, inner)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context=context, mask=mask)
        if self.use_linear:
            h = self.proj_out(h).transpose(1, 2).unflatten(2, (height, width))
        else:
            h = self.proj_out(h.transpose(1, 2).unflatten(2, (height, width)))
        return x + h

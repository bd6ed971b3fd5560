"""What a denoising backbone (UNet, DiT, ...) takes, checked in one place.

The contract every backbone follows: ``forward(x, timesteps, context=None, y=None) -> same shape as x`` with
x (B, in_channels, H, W) latents, timesteps float (B,), context (B, L, context_dim) exactly when it was built
with a ``context_dim``, and y exactly when it has ``num_classes`` ((B,) integer labels, null class included in
the count) or ``adm_in_channels`` ((B, adm_in_channels) vectors). Each backbone adds its own size rule.
"""

from __future__ import annotations

import torch


def check_denoiser_inputs(
    name: str, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None, *,
    in_channels: int, context_dim: int | None, num_classes: int | None, adm_in_channels: int | None,
) -> None:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name} expects x of shape (B, {in_channels}, H, W), got {tuple(x.shape)}.")
    if timesteps.shape != (x.shape[0],):
        raise ValueError(f"timesteps must have shape (B,) = ({x.shape[0]},), got {tuple(timesteps.shape)}.")
    if (context is None) != (context_dim is None):
        raise ValueError(
            f"{name} was built with context_dim={context_dim} but context is "
            f"{'missing' if context is None else 'given'}; pass context (B, L, D) exactly when context_dim is set."
        )
    if context is not None and (context.ndim != 3 or context.shape[-1] != context_dim):
        raise ValueError(f"context must be (B, L, {context_dim}), got {tuple(context.shape)}.")
    if (y is None) == (num_classes is not None or adm_in_channels is not None):
        raise ValueError(
            f"y must be given exactly when the {name} has num_classes ({num_classes}) or adm_in_channels "
            f"({adm_in_channels}); got y={'None' if y is None else tuple(y.shape)}."
        )
    if num_classes is not None and (y.ndim != 1 or y.is_floating_point()):
        raise ValueError(f"With num_classes, y must be (B,) integer labels, got {tuple(y.shape)} {y.dtype}.")
    if adm_in_channels is not None and (y.ndim != 2 or y.shape[1] != adm_in_channels):
        raise ValueError(f"With adm_in_channels, y must be (B, {adm_in_channels}), got {tuple(y.shape)}.")

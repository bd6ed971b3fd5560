"""The denoising backbone contract (UNet, DiT, ...): what a backbone declares, what it takes, and the checks.

A backbone is an ``nn.Module`` that knows nothing about diffusion. It declares

- ``in_channels``: latent channels plus the channels a conditioner concatenates (inpainting mask, ...);
- ``out_channels``: the latent channels it predicts;
- the condition kinds it consumes: ``context_dim`` (cross-attention tokens (B, L, context_dim), or None),
  ``num_classes`` (label ids incl. the null class for ``y`` of shape (B,), or None) and ``adm_in_channels``
  (a vector ``y`` of shape (B, adm_in_channels), or None);

and computes ``forward(x, timesteps, context=None, y=None) -> same shape as x[:, :out_channels]`` with x
(B, in_channels, H, W) and timesteps float (B,). The condition dict a conditioner makes
(``{"context", "y", "concat"}``) reaches a backbone only through :func:`run_backbone`, which joins ``concat``
to the input: a backbone never sees the conditioner, and a conditioner never reads a backbone's attributes.

It may also name ``fsdp_units``: the class names of the blocks FSDP shards as one unit each (default: none, the
whole backbone is one unit), and set ``learn_sigma`` (default False): its ``out_channels`` are then twice the latent
channels, the prediction followed by a learned variance (official DiT and guided-diffusion checkpoints, trained with
a variational bound term). Every objective and sampler here uses fixed variances: :func:`run_backbone` keeps the
prediction only, so such checkpoints load, sample and fine-tune with the usual losses.

A backbone *factory* (a class, or a Hydra ``_partial_``) takes :meth:`ConditionSpec.backbone_kwargs`, so a
config names only the backbone's own sizes and the conditioning wires itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Backbone(Protocol):
    in_channels: int
    out_channels: int
    context_dim: int | None
    num_classes: int | None
    adm_in_channels: int | None

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor: ...


BACKBONE_ATTRIBUTES = ("in_channels", "out_channels", "context_dim", "num_classes", "adm_in_channels")


@dataclass(frozen=True)
class ConditionSpec:
    """What a conditioner produces, so what the backbone beside it must consume."""

    context_dim: int | None = None  # width of the cross-attention tokens
    num_classes: int | None = None  # label ids fed as y (dataset classes + the null class)
    vector_dim: int | None = None  # width of a vector y
    concat_channels: int = 0  # channels joined to the noisy latents

    def backbone_kwargs(self, latent_channels: int) -> dict[str, Any]:
        """The arguments a backbone factory takes from the conditioning and the first stage."""
        return {
            "in_channels": latent_channels + self.concat_channels,
            "out_channels": latent_channels,
            "context_dim": self.context_dim,
            "num_classes": self.num_classes,
            "adm_in_channels": self.vector_dim,
        }


def check_backbone(backbone: Any, spec: ConditionSpec, latent_channels: int) -> None:
    """Fail at start-up, naming both values, when a backbone cannot consume this conditioning."""
    missing = [a for a in BACKBONE_ATTRIBUTES if not hasattr(backbone, a)]
    if missing:
        raise ValueError(f"{type(backbone).__name__} is not a backbone: it lacks {missing} (see ldm.nets.backbone).")
    expected = spec.backbone_kwargs(latent_channels)
    if getattr(backbone, "learn_sigma", False):
        expected["out_channels"] *= 2  # the prediction, then its learned variance (dropped by run_backbone)
    names = {"num_classes": "label ids (classes + null)", "adm_in_channels": "vector y width"}
    problems = [f"backbone {key}={getattr(backbone, key)} but the conditioning needs {value}"
                + (f" ({names[key]})" if key in names else "")
                for key, value in expected.items() if getattr(backbone, key) != value]
    if problems:
        raise ValueError("Backbone and conditioning disagree: " + "; ".join(problems) + ".")


def run_backbone(backbone: Any, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """The one place a condition dict is routed into a backbone call (concat joins the input channels)."""
    concat = cond.get("concat")
    x = x_t if concat is None else torch.cat([x_t, concat.to(x_t.dtype)], dim=1)
    out = backbone(x, t, context=cond.get("context"), y=cond.get("y"))
    if getattr(backbone, "learn_sigma", False):
        return out[:, : out.shape[1] // 2]  # (B, C, H, W): the prediction; the variance half has no use here
    return out


def check_denoiser_inputs(
    name: str, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None, *,
    in_channels: int, context_dim: int | None, num_classes: int | None, adm_in_channels: int | None,
) -> None:
    """The input check every backbone's forward runs (each adds its own size rule)."""
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

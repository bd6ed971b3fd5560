"""The embedder contract (Rombach et al. 2022, sec. 3.3: the domain-specific encoder tau_theta) with condition
dropout for classifier-free guidance (Ho & Salimans 2022).

An embedder reads its batch key(s) and produces one of three things a backbone consumes: 'context' (B, L, D)
tokens for cross-attention, 'y' (B,) labels or (B, D) vectors, or 'concat' (B, C, h, w) channels joined to the
backbone input. Dropout replaces a sample's *input* by the unconditional input (null class, empty caption,
zeros) before encoding, so a dropped sample is encoded exactly like `unconditional()`.

What the rest of the framework asks an embedder, so that a new one is one file plus one yaml:
- `batch_keys`: the keys the data must carry for it (collation and the latent cache keep exactly these);
- `example_inputs(request)`: inputs for previews, final samples, `ldm-sample` and `ldm-evaluate`;
- `prepare(batch, first_stage, generator)`: a step before encoding that needs the first stage (inpainting
  masks and encodes images there); the default passes the batch through;
- `spec`: what it adds to the backbone's inputs (`ldm.nets.backbone.ConditionSpec`).
A *guided* embedder (class, text) is dropped in guidance's unconditional branch; an unguided one (concat: the
masked image of inpainting, the low-resolution image of super-resolution) is kept in both branches, as
diffusers' inpainting and upscaling pipelines do, so guidance never pushes away from the known pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ExampleRequest:
    """What a caller wants conditions for: ``n`` samples, grouped (class-major or prompt-major).

    labels: (n,) class labels of the groups, when the set is organised by class (a class model's own classes,
        or the classes a judge will check); prompts: (n,) captions, when the user gave them; caption_for: the
        data's held-out phrasing of a class (text models sampled per class, so a judge can check them).
    """

    n: int
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    caption_for: Callable[[int], str] | None = None


class Embedder(nn.Module):
    """Base class: batch lookup, per-sample condition dropout, unconditional path.

    Subclasses set `output` ('context' | 'y' | 'concat') and implement `encode(inputs, drop)` where
    drop (B,) bool marks the samples whose input must be replaced by the unconditional one.
    """

    output: str
    # Output width of 'context' tokens or a vector 'y'; None for labels and concat.
    output_dim: int | None = None

    def __init__(self, input_key: str, drop_rate: float, guided: bool = True):
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate is a probability in [0, 1], got {drop_rate}.")
        self.input_key = input_key
        self.drop_rate = float(drop_rate)
        self.guided = bool(guided)

    def forward(
        self, batch: Mapping[str, Any], force_unconditional: bool = False, generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """force_unconditional: guidance's unconditional branch (a no-op for an unguided embedder).
        drop: (B,) bool chosen by the caller (the Conditioner's joint drop) instead of this embedder's own."""
        if self.input_key not in batch:
            raise KeyError(f"{type(self).__name__} reads batch['{self.input_key}'], but the batch has keys "
                           f"{sorted(batch)}; set input_key to one of them.")
        inputs = batch[self.input_key]
        batch_size = len(inputs)
        if force_unconditional:
            drop = torch.full((batch_size,), self.guided, dtype=torch.bool)
        elif drop is None:
            drop = self.drop_mask(batch_size, generator)
        return self.encode(inputs, drop)

    def drop_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) bool, True with probability drop_rate per sample while training; all False in eval."""
        if not self.training or self.drop_rate == 0.0:
            return torch.zeros(batch_size, dtype=torch.bool)
        return _bernoulli(batch_size, self.drop_rate, generator)

    def encode(self, inputs: Any, drop: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Keys the data must carry for this embedder (collation and the latent cache keep exactly these)."""
        return (self.input_key,)

    # Whether `prepare` needs the images themselves (not only cached latents).
    needs_images = False
    # Whether its examples come from user prompts (text encoders): ldm-sample then asks for prompts.
    takes_prompts = False

    def prepare(self, batch: dict[str, Any], first_stage: nn.Module, generator: torch.Generator | None = None):
        """The batch with this embedder's input made from other keys (default: unchanged)."""
        return batch

    def example_inputs(self, request: ExampleRequest) -> Any | None:
        """Inputs for ``request.n`` example samples, or None: this embedder then runs unconditionally there."""
        return None

    def unconditional(self, batch_size: int, device: torch.device | str | None = None, **kwargs: Any):
        raise NotImplementedError


def _bernoulli(batch_size: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) bool, True with probability p; drawn on the generator's device (a CUDA generator cannot fill a CPU
    tensor, and a seed then means one thing)."""
    device = generator.device if generator is not None else None
    return torch.rand(batch_size, generator=generator, device=device) < p

"""Class labels as a condition: a learned token (LDM-cin) or labels for the backbone's own embedding (ADM, DiT)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.nets.conditioners.base import Embedder, ExampleRequest


class ClassEmbedder(Embedder):
    """Class labels (B,) with an extra null class `num_classes` for the unconditional case.

    output='context': learned embedding -> (B, n_tokens, embed_dim) cross-attention tokens (LDM-cin).
    output='vector': the labels themselves (null class substituted) go to the UNet as `y`, whose
        `label_emb` must then hold `num_classes + 1` entries (see `label_count`).
    """

    def __init__(
        self, num_classes: int, embed_dim: int | None = None, n_tokens: int = 1, output: str = "context",
        input_key: str = "label", drop_rate: float = 0.1,
    ):
        super().__init__(input_key, drop_rate)
        if output not in ("context", "vector"):
            raise ValueError(f"ClassEmbedder output must be 'context' or 'vector', got {output!r}.")
        if num_classes < 1 or n_tokens < 1:
            raise ValueError(f"Need num_classes >= 1 and n_tokens >= 1, got {num_classes}, {n_tokens}.")
        self.num_classes, self.n_tokens = num_classes, n_tokens
        self.null_class = num_classes
        self.label_count = num_classes + 1
        if output == "context":
            if embed_dim is None:
                raise ValueError("ClassEmbedder(output='context') needs embed_dim (the UNet context_dim).")
            self.output, self.output_dim = "context", embed_dim
            self.embedding = nn.Embedding(self.label_count, n_tokens * embed_dim)
        else:
            self.output, self.output_dim = "y", None

    def encode(self, labels: Any, drop: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f"Class labels must be a (B,) integer tensor, got {tuple(labels.shape)} {labels.dtype}.")
        check_label_range(labels, self.num_classes)
        labels = torch.where(drop.to(labels.device), self.null_class, labels.long())
        return self._embed(labels)

    def unconditional(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        device = self.embedding.weight.device if self.output == "context" else device
        return self._embed(torch.full((batch_size,), self.null_class, dtype=torch.long, device=device))

    def _embed(self, labels: torch.Tensor) -> torch.Tensor:
        if self.output == "y":
            return labels
        labels = labels.to(self.embedding.weight.device)
        return self.embedding(labels).unflatten(-1, (self.n_tokens, -1))  # (B, n_tokens, D)


    def example_inputs(self, request: ExampleRequest) -> torch.Tensor | None:
        return request.labels  # None (a set organised by prompts): the null class


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Labels outside [0, num_classes) fail with a clear error on the CPU; on an accelerator, with a device-side
    assert: reading the range back to the host would stall every training step."""
    if not labels.numel():
        return
    if labels.device.type != "cpu":
        torch._assert_async((labels.min() >= 0) & (labels.max() < num_classes),
                            f"class labels must lie in [0, {num_classes}): set num_classes to the dataset's number of classes")
        return
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]. "
            "Set num_classes to the dataset's number of classes."
        )

"""Learning-rate schedules: linear warm-up, then constant or cosine decay. No hidden LR scaling."""

from __future__ import annotations

import math

import torch


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 0,
    kind: str = "constant",
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier on the base LR: linear 0 -> 1 over ``warmup_steps``, then ``constant`` or ``cosine``
    down to ``min_lr_ratio`` at ``total_steps``. Stepped once per optimizer step."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"optim.scheduler.kind must be 'constant' or 'cosine', got {kind!r}")
    if kind == "cosine" and not total_steps:
        raise ValueError("optim.scheduler.kind=cosine needs total_steps (defaults to stage.max_steps)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

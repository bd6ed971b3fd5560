"""Process-wide numerics switches that every command running a network sets the same way."""

from __future__ import annotations

import torch


def set_tf32(enabled: bool | None) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on Ampere+ GPUs (10-bit mantissa inputs, fp32
    accumulation): several times faster sampling and feature extraction there, no effect on the CPU.
    None leaves PyTorch's defaults alone."""
    if enabled is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)

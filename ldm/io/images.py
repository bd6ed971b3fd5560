"""Image grids as uint8 arrays and PNG files written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def to_uint8_grid(images: Tensor, nrow: int = 8) -> np.ndarray:
    """Images in [-1, 1], shape (B, C, H, W) with C in {1, 3} -> one uint8 (H', W', 3) grid."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    unit = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
    grid = make_grid(unit, nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W'); grey images become RGB
    return (grid * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W[, 3]) array as PNG atomically: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path

"""Sample sets on disk in the evaluators' formats: ``samples.npz`` with ``arr_0`` uint8 NHWC (the ADM/DiT
evaluator convention) plus ``labels`` and/or ``prompts``, and ``manifest.json`` with the settings and the seed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.io.export import atomic_path, write_text_atomic


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding as the ADM evaluator expects."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_samples_npz(path: str | Path, images: torch.Tensor, **extra: Any) -> Path:
    """``arr_0`` uint8 NHWC plus e.g. ``labels`` (int64) or ``prompts`` (unicode), atomically."""
    arrays = {"arr_0": to_uint8_nhwc(images)}
    for key, value in extra.items():
        if value is None:
            continue
        arrays[key] = np.asarray(value.cpu() if torch.is_tensor(value) else value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def write_manifest(path: str | Path, settings: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True, default=str))

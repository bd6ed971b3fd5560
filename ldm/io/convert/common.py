"""Shared pieces of the diffusers <-> CompVis key conversion: the error type and strict renaming."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.io.export import ExportError


class ConversionError(ExportError):
    """A model or state dict that cannot be expressed in the other layout; the message names why."""


def key_report(expected: set[str], given: set[str], source: str) -> None:
    """Raise a ConversionError listing missing and unexpected keys (same format as load_state_strict)."""
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        lines = [f"weights in {source} do not fit the expected layout:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:8]}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:8]}")
        raise ConversionError("\n".join(lines))


def rename(
    state: Mapping[str, torch.Tensor], names: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    key_report(set(names), set(state), source)
    return {names[k]: v for k, v in state.items()}


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def per_level(value: Any, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ConversionError(f"{name} has {len(values)} entries for {levels} levels")
    return values

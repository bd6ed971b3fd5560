"""The exceptions every layer raises for bad input. Both are ValueErrors, so the CLIs turn them into one line
that names the fix (``ldm.config.user_errors_as_messages``); they live here, below every package, so the
model, io and metrics layers need not import the Hydra entry points to raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot work, found before any training starts."""


class ExportError(ValueError):
    """An export folder is missing, incomplete or of the wrong kind."""

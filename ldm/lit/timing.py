"""Wall-clock time per training epoch and for the whole fit, logged like any metric.

Studies compare configurations by what they cost (the latent-cache study is nothing else), so the time
is measured inside the run, by the same clock for every job, rather than read off the progress bar.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class EpochTimer(pl.Callback):
    """Logs ``time/epoch_s`` (the training epoch's wall time, validation excluded) at each epoch end and
    keeps ``time/fit_s`` (from fit start, set-up such as latent caching included) in ``callback_metrics``."""

    def __init__(self) -> None:
        self._fit_start = 0.0
        self._epoch_start = 0.0
        self._validation_s = 0.0
        self._validation_started = 0.0
        self.epoch_times: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._validation_s = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation inside a training epoch (val_check_interval) is not the epoch's training cost; the
        # sanity check runs before the first epoch starts and is reset with it.
        self._validation_s += time.perf_counter() - self._validation_started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_start - self._validation_s
        self.epoch_times.append(seconds)
        pl_module.log("time/epoch_s", seconds, on_step=False, on_epoch=True, sync_dist=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        trainer.callback_metrics["time/fit_s"] = torch.tensor(time.perf_counter() - self._fit_start)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_times": list(self.epoch_times)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_times = list(state_dict.get("epoch_times", []))

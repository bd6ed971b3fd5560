"""The console progress bar: Lightning's rich bar, described by steps when the run is bounded by steps, reading
the logged metrics only as often as the loggers do."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics


class StepProgressBar(RichProgressBar):
    """Lightning's RichProgressBar with two changes.

    - Training here stops at ``max_steps`` with ``max_epochs=-1``, which Lightning's bar shows as ``Epoch 0/-2``;
      this one reads ``Epoch 0 · step limit 1000`` (the bar itself counts the epoch's batches).
    - Its metrics are read every ``trainer.log_every_n_steps`` training steps. Each metric logged to the bar is a
      device tensor, and Lightning's bar reads all of them (``.item()``) after every batch: one host-device sync
      per step per metric, which keeps the host from running ahead of the device. Between logging steps the bar
      shows the values it last read; outside training (validation) it reads them every time, as Lightning does.
      Before the first logging step it shows none.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: dict[str, Any] | None = None
        self._shown_step = -1

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch} · step limit {trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        step = trainer.global_step
        if not trainer.training or (step != self._shown_step and step % max(1, int(trainer.log_every_n_steps)) == 0):
            self._shown, self._shown_step = super().get_metrics(trainer, pl_module), step
        return self._shown if self._shown is not None else get_standard_metrics(trainer)

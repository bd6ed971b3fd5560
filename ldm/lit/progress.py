"""The console progress bar: Lightning's rich bar, described by steps when the run is bounded by steps."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Training here stops at ``max_steps`` with ``max_epochs=-1``, which Lightning's bar shows as
    ``Epoch 0/-2``; this one reads ``Epoch 0 · step limit 1000`` (the bar itself counts the epoch's batches)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch} · step limit {trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}"

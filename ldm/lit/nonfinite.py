"""The non-finite guard: a NaN or inf in the loss or the gradients never reaches the weights, the optimizer state or
the EMA; on a fused optimizer without a host-device sync per step."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# The same logger as before the guard had its own file: warnings keep their name.
log = logging.getLogger("ldm.reliability")

NAN_POLICIES = ("skip", "stop")


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient and was configured (or forced) to stop."""


class NonFiniteGuard(pl.Callback):
    """Detects a non-finite loss or gradient before it reaches the weights.

    Every loss that is backpropagated and every gradient an optimizer is about to apply are checked
    (both stages: automatic and manual optimisation pass through the same hooks). A bad step leaves the
    weights, the optimizer's moments and step count, and the EMA alone. Then, by ``policy``:

    * ``skip``: count it (``train/nonfinite_skipped``), warn with the step, continue; more than
      ``max_consecutive_skips`` bad steps in a row means the run has diverged, and it stops.
    * ``stop``: write ``nonfinite-step<N>.ckpt`` (the last good weights) and raise ``NonFiniteLossError``
      naming the step, the loss terms and that checkpoint.

    How a step is skipped: with ``skip`` and an optimizer that takes a ``found_inf`` flag (fused AdamW/Adam,
    the default ``conf/optim``), on the device: the flag tells the fused kernel to leave everything as it was,
    the counts stay on the device, and the host reads them every ``trainer.log_every_n_steps`` steps (and at
    the end), so a step costs no host-device sync; warnings and the divergence stop come at those steps.
    Otherwise (``stop``, other optimizers) the check syncs once per optimizer step and drops the gradients
    (set to None), which torch optimizers skip entirely.

    A skipped step still counts towards ``max_steps`` and the LR schedule, as GradScaler's skips do.
    Under fp16 mixed precision the loss scaler already skips steps with overflowing gradients (it needs
    them to calibrate), so there only the loss is checked.
    """

    def __init__(self, policy: str = "skip", max_consecutive_skips: int = 10, dirpath: str | None = None) -> None:
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan guard policy must be one of {NAN_POLICIES}, got {policy!r}")
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.policy = policy
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None
        self._bad_step = False
        self._bad_what: list[str] = []
        # Device-side path: [skipped, consecutive, most in a row, first bad step, loss bad, gradient bad] since the
        # last read, on the device; and the optimizer step of the last read.
        self._counts: torch.Tensor | None = None
        self._read_step = -1

    def state_dict(self) -> dict[str, Any]:
        self._read_counts()
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self._counts = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # stays on the device
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if self.policy == "skip" and not scaled and takes_found_inf(optimizer):
            self._flag_on_device(trainer, optimizer, loss_finite)
            return
        bad = []
        if loss_finite is not None and not bool(loss_finite):
            bad.append("loss")
        if not scaled and not gradients_finite(optimizer):
            bad.append("gradient")
        if bad:
            # No gradient, no update: torch optimizers skip parameters whose .grad is None entirely
            # (no moment update, no weight decay, no step count).
            optimizer.zero_grad(set_to_none=True)
            self._bad_step = True
            self._bad_what.extend(w for w in bad if w not in self._bad_what)

    def _flag_on_device(self, trainer: pl.Trainer, optimizer: Any, loss_finite: torch.Tensor | None) -> None:
        grads_finite = gradients_finite_tensor(optimizer)
        if grads_finite is None:
            return
        loss_bad = ~loss_finite.to(grads_finite.device) if loss_finite is not None else torch.zeros_like(grads_finite)
        bad = loss_bad | ~grads_finite
        # The fused kernel skips the whole update (moments, weight decay, step count) where found_inf is 1; the
        # EMA reads the same flag (LatentDiffusionModule.optimizer_step).
        optimizer.found_inf = bad.to(torch.float32)
        if self._counts is None or self._counts.device != bad.device:
            self._counts = torch.tensor([0, self.consecutive, self.consecutive, -1, 0, 0], device=bad.device)
        c, b = self._counts, bad.long()
        consecutive = (c[1] + 1) * b
        first = torch.where((c[3] < 0) & bad, trainer.global_step + 1, c[3])
        self._counts = torch.stack([c[0] + b, consecutive, torch.maximum(c[2], consecutive), first,
                                    c[4] | (loss_bad & bad).long(), c[5] | (~grads_finite & bad).long()])

    def _read_counts(self) -> tuple[int, int, int, str]:
        """Fold the device counts into the host's (one sync): (skipped in the window, most in a row, first bad
        step, what was bad)."""
        if self._counts is None:
            return 0, 0, -1, ""
        skipped, consecutive, most, first, loss_bad, grad_bad = (int(v) for v in self._counts.tolist())
        self.skipped += skipped
        self.consecutive = consecutive
        self._counts = torch.tensor([0, consecutive, consecutive, -1, 0, 0], device=self._counts.device)
        what = " and ".join(w for w, flag in (("loss", loss_bad), ("gradient", grad_bad)) if flag)
        return skipped, most, first, what

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._counts is not None:
            step = trainer.global_step
            if step != self._read_step and step % max(1, int(trainer.log_every_n_steps)) == 0:
                self._read_step = step
                self._check_window(trainer, pl_module)
            return
        bad, what = self._bad_step, " and ".join(self._bad_what)
        self._bad_step, self._bad_what = False, []
        if not bad:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if not bad:
            return
        terms = loss_terms(trainer, outputs)
        step = trainer.global_step
        diverged = self.consecutive > self.max_consecutive_skips
        if self.policy == "skip" and not diverged:
            log.warning("non-finite %s at step %d (%s): step skipped, %d skipped so far", what, step, terms, self.skipped)
            return
        self._stop(trainer, what, step, terms, diverged)

    def _check_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
        skipped, most, first, what = self._read_counts()
        if pl_module is not None:
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if not skipped:
            return
        if most > self.max_consecutive_skips:
            self._stop(trainer, what, first, f"{most} in a row by step {trainer.global_step}", diverged=True, consecutive=most)
        log.warning("non-finite %s at step %d: %d step(s) skipped since the last check (step %d), %d skipped so far",
                    what, first, skipped, trainer.global_step, self.skipped)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counts is not None:
            self._check_window(trainer, None)
            trainer.callback_metrics["train/nonfinite_skipped"] = torch.tensor(float(self.skipped))

    def _stop(self, trainer: pl.Trainer, what: str, step: int, terms: str, diverged: bool,
              consecutive: int | None = None) -> None:
        ckpt = (self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / f"nonfinite-step{step:07d}.ckpt"
        trainer.save_checkpoint(ckpt)
        reason = (
            f"{consecutive or self.consecutive} steps in a row (callbacks.nan_guard.max_consecutive_skips="
            f"{self.max_consecutive_skips}): the run has diverged" if diverged else "callbacks.nan_guard.policy=stop"
        )
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} ({terms}); stopped by {reason}. The last good weights are in "
            f"{ckpt} (resuming from it continues after this batch). Try a lower learning rate, "
            "trainer.gradient_clip_val=1.0, or trainer.precision=32-true"
            + ("" if diverged else ", or callbacks.nan_guard.policy=skip to skip such steps")
        )


def takes_found_inf(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` skips its update on the device when ``optimizer.found_inf`` is set: torch's
    fused Adam/AdamW/SGD (the kernels GradScaler drives without a sync)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


def gradients_finite_tensor(optimizer: Any) -> torch.Tensor | None:
    """A 0-dim bool tensor on the gradients' device: whether every gradient is finite (None: no gradients).
    Under FSDP the max-norm over DTensor shards is itself collective, so every rank gets the same answer."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    # The max-norm never overflows on finite values and is NaN/inf as soon as one entry is.
    norm = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
    full_tensor = getattr(norm, "full_tensor", None)
    return torch.isfinite(full_tensor() if full_tensor is not None else norm)


def gradients_finite(optimizer: Any) -> bool:
    """Whether every gradient the optimizer holds is finite (one device sync: max |g| over all)."""
    finite = gradients_finite_tensor(optimizer)
    return True if finite is None else bool(finite)


def loss_terms(trainer: pl.Trainer, outputs: Any) -> str:
    """The training losses logged this step, ``name=value`` joined, for error messages."""
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "nonfinite" not in k}
    if not values and isinstance(outputs, dict) and torch.is_tensor(outputs.get("loss")):
        values["loss"] = float(outputs["loss"])
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())) or "no loss logged"

"""Callbacks that keep a long run continuable: RNG state in checkpoints, a checkpoint on preemption, and a
guard against non-finite losses and gradients.

Lightning already checkpoints the weights, optimizers, LR schedulers, loop progress and (through
``ResumableDataLoader``) the data position; these add what it leaves out, so that N steps straight and
N/2 steps + resume + N/2 steps end in the same state, bit for bit on CPU.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("ldm.reliability")

NAN_POLICIES = ("skip", "stop")


# --- RNG state ------------------------------------------------------------------------------------
def collect_rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain types only, so the
    checkpoint still loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RNGStateCheckpoint(pl.Callback):
    """Saves the global RNG streams in every checkpoint and restores them on resume.

    Lightning seeds once at start-up, so without this a resumed run draws the diffusion noise, timesteps
    and posterior samples of its first steps from the seed's stream again. The state is restored right
    before the first training batch after the checkpoint is loaded, not at load time: whatever draws from
    the global generators in between (e.g. a DataLoader without its own generator taking its workers'
    base seed) would otherwise shift the stream.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


# --- last.ckpt at stops ------------------------------------------------------------------------------
class ResumeCheckpoint(pl.Callback):
    """Keeps ``<dirpath>/last.ckpt`` current at the two moments ModelCheckpoint (which saves at validation)
    misses: a preemption signal, and the end of training between two validations.

    Preemption:

    * SIGTERM: Lightning's own handler lets the step in progress finish and raises ``SIGTERMException`` out
      of the fit loop; this callback writes last.ckpt at that point, a clean step boundary from which
      ``ckpt_path=last`` continues exactly, and ``ldm-train`` exits with status 143.
    * ``requeue_signals`` (SIGUSR1, and SIGUSR2, which submitit, hence ``hydra/launcher=slurm``, sends before
      the time limit): noted when they arrive; at the next step boundary the ranks agree that one arrived
      (on any of them), write last.ckpt, and, under SLURM, rank 0 requeues the job with ``scontrol requeue``;
      then the run stops like on SIGTERM. The requeued job finds its last.ckpt (same run folder, from the job
      id) with ``ckpt_path=last``. The ranks compare notes every ``every_n_steps`` optimizer steps (an
      all-reduce is a host-device sync): keep their time well inside the scheduler's warning (90 s by default).
      This replaces Lightning's SLURM handler, which saves from inside the
      signal handler, mid-step, and listens on SIGUSR1 only.
    """

    def __init__(self, dirpath: str, filename: str = "last", requeue_signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGUSR2"),
                 every_n_steps: int = 1) -> None:
        if not filename:
            raise ValueError("ResumeCheckpoint needs a filename (without .ckpt)")
        if every_n_steps < 1:
            raise ValueError(f"ResumeCheckpoint every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        unknown = [name for name in requeue_signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown:
            raise ValueError(f"unknown requeue_signals {unknown}: use names such as SIGUSR1, SIGUSR2")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.requeue_signals = [getattr(signal, str(name)) for name in requeue_signals]
        self._saved_step = -1
        self._previous_handlers: dict[int, Any] = {}
        self._requested: int | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step = -1
        self._requested = None
        for signum in self.requeue_signals:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_requeue_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        # Only noted: a checkpoint written from here would catch the step (and any collective) midway.
        self._requested = signum

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Every rank joins this all-reduce, so all stop at the same step; every_n_steps optimizer steps only (the
        # same steps on every rank), as each is a host-device sync.
        if trainer.global_step % self.every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested is not None, all=False):
            return
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            requeued = requeue_slurm_job()
            print(
                f"ldm-train: stopped by a signal at step {trainer.global_step}; checkpoint written to {self.ckpt_path}. "
                + (f"Requeued SLURM job {requeued}." if requeued else
                   f"Resume with ckpt_path=last (same run_name) or ckpt_path={self.ckpt_path}"),
                flush=True,
            )
        raise SIGTERMException()  # out of the fit loop as on SIGTERM (exit status 143); already saved

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # ModelCheckpoint writes its top-k file and last.ckpt at the same step.
        self._saved_step = int(checkpoint.get("global_step", -1))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the export callbacks, whose latent statistics draw from the global RNG.
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.ckpt_path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or self._requested is not None:
            return  # not a preemption, or a requeue signal that on_train_batch_end has handled
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            print(
                f"ldm-train: stopped by a signal at step {trainer.global_step}; checkpoint written to "
                f"{self.ckpt_path}. Resume with ckpt_path=last (same run_name) or ckpt_path={self.ckpt_path}",
                flush=True,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()


def requeue_slurm_job() -> str | None:
    """``scontrol requeue`` this SLURM job (array jobs by ``<array job id>_<task id>``); its id, or None
    outside SLURM or when scontrol fails (said in the log)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("not requeueing: SLURM job id %r is not numeric", job_id)
        return None
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job_id, err)
        return None
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return None
    return job_id


# --- non-finite guard -----------------------------------------------------------------------------
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


# --- logs -----------------------------------------------------------------------------------------
def keep_csv_history(loggers: list[Any]) -> list[Path]:
    """Move a CSVLogger's existing ``metrics.csv`` to ``metrics.<n>.csv`` before a resumed run starts.

    Lightning's CSV writer deletes ``metrics.csv`` when it opens a log folder that has one, which on a
    resume in the same run folder would erase the curve of every step trained so far. Returns the files
    kept (segment ``n`` = the n-th interrupted part of the run, in order).
    """
    from lightning.pytorch.loggers import CSVLogger

    kept = []
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        metrics = Path(logger.log_dir) / "metrics.csv"
        if metrics.is_file():
            n = 1 + sum(1 for _ in metrics.parent.glob("metrics.*.csv"))
            kept.append(metrics.rename(metrics.with_name(f"metrics.{n}.csv")))
            log.info("kept the metrics logged before this resume in %s", kept[-1])
    return kept

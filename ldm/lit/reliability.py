"""Callbacks that keep a long run continuable: RNG state in checkpoints, a checkpoint on preemption, and a
guard against non-finite losses and gradients.

Lightning already checkpoints the weights, optimizers, LR schedulers, loop progress and (through
``ResumableDataLoader``) the data position; these add what it leaves out, so that N steps straight and
N/2 steps + resume + N/2 steps end in the same state, bit for bit on CPU.
"""

from __future__ import annotations

import logging
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

from ldm.lit.nonfinite import NAN_POLICIES, NonFiniteGuard, NonFiniteLossError  # noqa: F401 (their old home)

log = logging.getLogger("ldm.reliability")


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

    Preemption: SIGTERM and the ``requeue_signals`` (SIGUSR1, and SIGUSR2, which submitit, hence
    ``hydra/launcher=slurm``, sends before the time limit) are only noted when they arrive. At the next optimizer
    step boundary the ranks agree that one arrived (on any of them), write last.ckpt, and, for a requeue signal
    under SLURM, rank 0 requeues the job with ``scontrol requeue``; then the run stops with ``SIGTERMException``
    (``ldm-train`` exits with status 143) and ``ckpt_path=last`` continues it exactly. A step boundary, not any
    micro-batch: under gradient accumulation the gradients summed so far are in no checkpoint, so a resumed run
    would take its first step on part of a batch. This replaces Lightning's handlers, which stop after any
    micro-batch (SIGTERM) or save from inside the signal handler, mid-step (SLURM's SIGUSR1). The ranks compare
    notes every ``every_n_steps`` optimizer steps (an all-reduce is a host-device sync): keep their time well
    inside the scheduler's warning (90 s by default).
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
        self._step_at_batch_start = -1

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step = -1
        self._requested = None
        self._handle(self.requeue_signals)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning has installed its SIGTERM handler (which would stop after any micro-batch): ours replaces it.
        self._handle([signal.SIGTERM])

    def _handle(self, signums: list[int]) -> None:
        for signum in signums:
            try:
                previous = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                continue
            self._previous_handlers.setdefault(signum, previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only noted: a checkpoint written from here would catch the step (and any collective) midway.
        self._requested = signum

    def _restore_handlers(self, signums: list[int] | None = None) -> None:
        for signum in list(self._previous_handlers) if signums is None else signums:
            if signum in self._previous_handlers:
                handler = self._previous_handlers.pop(signum)
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # no optimizer step in this micro-batch: its accumulated gradients would be lost
        # Every rank joins this all-reduce, so all stop at the same step boundary; with several ranks every
        # every_n_steps optimizer steps only (the same steps on every rank), as each is a host-device sync.
        # One process needs no agreement: it stops at the first boundary.
        if trainer.world_size > 1 and trainer.global_step % self.every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested is not None, all=False):
            return
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            requeued = requeue_slurm_job() if self._requested in self.requeue_signals else None
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
        # SIGTERM's previous handler is Lightning's: put back before Lightning's teardown puts back the one it found.
        self._restore_handlers([signal.SIGTERM])
        # Runs before the export callbacks, whose latent statistics draw from the global RNG.
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.ckpt_path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or self._requested is not None:
            return  # not a preemption, or a signal that on_train_batch_end has handled
        # Lightning's own SIGTERM handler stopped the run before training began (during set-up or sanity checks).
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

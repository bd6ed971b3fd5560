"""Throughput telemetry: samples/s, model FLOP utilisation, the share of time spent waiting for data, peak memory.

An epoch of a million-image stream takes days, so ``time/epoch_s`` says nothing for most of a run. These figures
are taken over each window of ``trainer.log_every_n_steps`` optimizer steps and logged (and shown in the progress
bar) at its end, the only moment the host waits for the device: in between, the callback reads clocks only.
Lightning's ``ThroughputMonitor`` synchronises the device after every batch, which is the stall this avoids.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("ldm.telemetry")


def precision_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a Lightning precision string (what the matmuls run in)."""
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of one device for ``dtype`` from Lightning's table of GPUs (and TPUs); None elsewhere."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, dtype)
    return float(peak) if peak else None


class ThroughputTelemetry(pl.Callback):
    """Logs, every ``trainer.log_every_n_steps`` optimizer steps, over the steps since the last log:

    * ``perf/samples_per_s``: training samples per second, all ranks together;
    * ``perf/mfu``: model FLOP utilisation per device, the FLOPs the step computes (counted once with
      ``torch.utils.flop_counter.FlopCounterMode`` over one whole training batch: forward, backward, and the
      frozen encoders where they run; with gradient checkpointing, the recomputed forward too, so it is then the
      hardware FLOP utilisation) per sample x this rank's samples / time / the device's peak;
      ``peak_tflops`` sets the peak (TFLOP/s per device); null: Lightning's table for the GPU and the trainer's
      precision (none on CPU: then no MFU);
    * ``perf/data_wait``: the share of wall time the host spent between one batch's end and the next one's start
      (fetching and moving the batch, validation excluded). The host runs ahead of the device, so a wait shorter
      than the device's queue costs nothing: read it as an upper bound on the device's idle share;
    * ``perf/peak_mem_gib``: the most memory the device's allocator held (CUDA), or the process's peak resident
      memory on CPU.

    ``flops_at_step``: FLOPs are counted on the first batch from this optimizer step on (the counting slows that
    batch, which is kept out of the windows); past the first, so set-up work done once is not counted as per-step
    work. The count is kept in checkpoints: a resumed run does not count again, so it computes exactly what the
    straight run computed (ops under a dispatch mode may take other kernels).
    """

    def __init__(self, peak_tflops: float | None = None, flops_at_step: int = 1, prog_bar: bool = True) -> None:
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (TFLOP/s per device), got {peak_tflops}")
        if flops_at_step < 0:
            raise ValueError(f"flops_at_step must be >= 0, got {flops_at_step}")
        self.peak_tflops = peak_tflops
        self.flops_at_step = int(flops_at_step)
        self.prog_bar = prog_bar
        self.flops_per_sample: float | None = None
        self.peak_flops: float | None = None
        self.last: dict[str, float] = {}
        self._counter: FlopCounterMode | None = None
        self._window_start: float | None = None
        self._samples = 0
        self._wait = 0.0
        self._batch_end: float | None = None
        self._logged_step = -1
        self._paused: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = precision_dtype(str(trainer.precision))
        self.peak_flops = self.peak_tflops * 1e12 if self.peak_tflops else device_peak_flops(pl_module.device, dtype)
        if self.peak_flops is None:
            # On a CPU no peak is expected (said in the log only); on an accelerator, Lightning's table misses it.
            say = log.info if pl_module.device.type == "cpu" else rank_zero_warn
            say("perf/mfu is not logged: no peak FLOP/s is known for this device; set "
                "callbacks.telemetry.peak_tflops=<dense TFLOP/s of one device at this precision>")
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._window_start, self._batch_end = None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_end is not None and self._window_start is not None:
            self._wait += now - self._batch_end
        if trainer.global_step >= self.flops_at_step and self.flops_per_sample is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples = batch_size_of(batch)
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            self.flops_per_sample = counter.get_total_flops() / max(1, samples)
            if not self.flops_per_sample:
                rank_zero_warn("perf/mfu is not logged: FlopCounterMode counted no FLOPs (a compiled backbone runs "
                               "kernels the counter does not see)")
            self._restart_window()  # the counted batch ran slowly: keep it out of the figures
            return
        if self._window_start is None:  # the first batch (set-up, first-call costs) is not part of any window
            self._restart_window()
            return
        self._samples += samples
        step = trainer.global_step
        if step == self._logged_step or step % max(1, int(trainer.log_every_n_steps)):
            self._batch_end = time.perf_counter()
            return
        self._logged_step = step
        self._log_window(trainer, pl_module)
        self._restart_window()

    def state_dict(self) -> dict[str, Any]:
        return {"flops_per_sample": self.flops_per_sample}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flops_per_sample = state_dict.get("flops_per_sample")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        paused = self._paused
        if paused is not None and self._window_start is not None:
            # Validation is not training throughput: the window resumes where it stopped.
            self._window_start += time.perf_counter() - paused
            if self._batch_end is not None:
                self._batch_end += time.perf_counter() - paused
        self._paused = None

    def _restart_window(self) -> None:
        self._window_start = self._batch_end = time.perf_counter()
        self._samples, self._wait = 0, 0.0

    def _log_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a logging step: the one place the host waits for the device
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        figures = {
            "perf/samples_per_s": self._samples * trainer.world_size / seconds,
            "perf/data_wait": self._wait / seconds,
            "perf/peak_mem_gib": peak_memory_bytes(device) / 2**30,
        }
        if self.flops_per_sample and self.peak_flops:
            figures["perf/mfu"] = self.flops_per_sample * self._samples / seconds / self.peak_flops
        if self.flops_per_sample:
            figures["perf/tflops_per_s"] = self.flops_per_sample * self._samples / seconds / 1e12
        self.last = figures
        shown = {"perf/samples_per_s", "perf/mfu"} if self.prog_bar else set()
        for name, value in figures.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name in shown, batch_size=1)


def peak_memory_bytes(device: torch.device) -> int:
    """The allocator's peak on a CUDA device; else the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (or list) of samples."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if torch.is_tensor(value) and value.ndim:
            return int(value.shape[0])
    for value in values:
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError(f"cannot tell the number of samples of a batch of {type(batch).__name__}")

"""Counting host-device synchronisations: each one stalls the host until the accelerator has drained its queue,
so a training step with one per step never overlaps the next step's launch with this one's compute.

``SyncCounter`` is a dispatch mode (plus a function mode for what never reaches the dispatcher on the CPU) that
records every operation which, on an accelerator, makes the host wait for the device: reading a value
(``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``: ``aten._local_scalar_dense``), an output whose shape depends
on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``), and copies to the host. It runs
on the CPU as well, which is how the tests check the training step without a GPU. ``StepSyncCounter`` is a
Lightning callback that counts per training step.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read device memory on the host, or whose output size the host must learn from the device.
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
# Tensor methods that read values without a dispatcher call when the tensor is on the CPU.
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}
# Checks written to run on the CPU only (``if t.device.type == "cpu" and ...``): they never run on an accelerator,
# so a CPU count must not hold them against the step. (module, function)
CPU_ONLY_CHECKS = {("ldm.diffusion.schedules", "_as_time"), ("ldm.nets.conditioners.class_label", "check_label_range")}


def _is_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


def _to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _cpu_only_check() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) in CPU_ONLY_CHECKS:
            return True
        frame = frame.f_back
    return False


class _Reads(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.counter._record(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.by_op`` (op name -> count)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._reads = _Reads(self)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _record(self, name: str) -> None:
        if not _cpu_only_check():
            self.by_op[name] += 1

    def __enter__(self) -> SyncCounter:
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS or (func in _INDEX_OPS and _is_bool_index(args)) or _to_host(func, args, kwargs):
            self._record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


class StepSyncCounter(pl.Callback):
    """Counts the syncs of each training batch, from ``on_train_batch_start`` to the end of the module's own
    ``on_train_batch_end`` (every callback's included; fetching the next batch is not): ``counts`` maps the
    optimizer step the batch ended on to its count, ``ops`` to the ops."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.ops: dict[int, Counter[str]] = {}
        self._mode: SyncCounter | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._stop(trainer)
        self._mode = SyncCounter().__enter__()
        # Close the window after the module's on_train_batch_end, which Lightning calls after every callback's.
        hook = pl_module.on_train_batch_end

        def end_then_stop(*args: Any, **kwargs: Any) -> Any:
            try:
                return hook(*args, **kwargs)
            finally:
                pl_module.on_train_batch_end = hook
                self._stop(trainer)

        pl_module.on_train_batch_end = end_then_stop

    def _stop(self, trainer: pl.Trainer) -> None:
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        step = trainer.global_step
        self.counts[step] = self.counts.get(step, 0) + mode.total
        self.ops.setdefault(step, Counter()).update(mode.by_op)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)

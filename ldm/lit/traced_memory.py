"""Traced memory: the bytes of tensor storage a process allocates on a real device (not meta) while a block
runs, counted from the dispatcher, so a memory bound (FSDP's "1/world of the weights per rank") is measured on
the CPU, where no allocator keeps statistics.

Every op's fresh output storage (not a view or an in-place result: those alias storage already counted or held
before) is counted once when it appears and released when Python frees it (a weak reference on the storage),
so ``peak`` is the most held at once and ``held`` what is still alive. Not seen: storage made outside the
dispatcher (``torch.from_numpy``, safetensors' loads) and storage that existed before the block.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TracedMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0  # every fresh storage's bytes, freed or not
        self.held = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave out what the block allocates (a test's reference copy)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in _real(tree_leaves((args, kwargs)))}
        for tensor in _real(tree_leaves(out)):
            if tensor.untyped_storage().data_ptr() not in inputs:  # a view or an in-place result is not new
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        self._seen.add(storage)
        size = storage.nbytes()
        self.allocated += size
        self.held += size
        self.peak = max(self.peak, self.held)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.held -= size



def _real(leaves) -> list[torch.Tensor]:
    """The plain tensors not on the meta device among ``leaves``, a DTensor's local shard for the DTensor (the
    mode is off while the DTensor computes its local result, so that result is never dispatched to it)."""
    from torch.distributed.tensor import DTensor

    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in leaves]
    # Other subclasses (a functional collective's AsyncCollectiveTensor) wrap a plain tensor counted itself.
    return [t for t in tensors if type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta]

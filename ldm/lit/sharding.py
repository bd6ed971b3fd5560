"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for stage 2, as Lightning's
``ModelParallelStrategy`` expects it: the module shards itself in ``configure_model``.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP2 keeps every parameter a ``DTensor`` sharded on
dim 0 with its own name and shape, so an EMA copy sharded the same way averages shard against shard with
no communication, and the same code runs on CPU/gloo (tests) and on GPUs/NCCL. FSDP1 refuses the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


def shard_module(module: nn.Module, mesh, unit_names: Iterable[str]) -> None:
    """``fully_shard`` every submodule whose class name is in ``unit_names`` (each is one all-gather in
    forward and one reduce-scatter in backward), then the module itself for the parameters left over."""
    from torch.distributed.fsdp import fully_shard

    names = set(unit_names)
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in names:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)


def reshard(module: nn.Module) -> None:
    """Put a sharded module's parameters back into their shards (a forward of FSDP2's root module, which
    no backward follows, leaves them gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor``; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a module, sharded or not. Collective under FSDP: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in module.state_dict().items()}



class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every device data parallel (FSDP2 alone, no tensor
    parallelism) whatever the number of devices and nodes: its own ``data_parallel_size="auto"`` would
    mean one data-parallel rank per node."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

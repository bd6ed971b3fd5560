"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for stage 2, as Lightning's
``ModelParallelStrategy`` expects it: the module shards itself in ``configure_model``.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP2 keeps every parameter a ``DTensor`` sharded on
dim 0 with its own name and shape, so an EMA copy sharded the same way averages shard against shard with
no communication, and the same code runs on CPU/gloo (tests) and on GPUs/NCCL. FSDP1 refuses the CPU.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ldm.errors import ConfigError

# Lightning's trainer.precision -> the dtype the sharded parameters are all-gathered in for compute (their
# gradients are reduce-scattered in fp32 whenever compute is in 16 bits). bf16-mixed: bf16 weights on the wire
# and in the matmuls (half the all-gather bytes, no re-cast under autocast), gradients summed in fp32 (a bf16
# sum over 32 ranks loses low bits); the sharded master weights and the optimizer state stay fp32.
# bf16-true / 16-true: Lightning has already cast the weights; only the reduction is widened.
_PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": None, "16-true": None, "32-true": None, "64-true": None}
_FSDP_STRATEGIES = ("FullyShardedStrategy", "ModelParallelStrategy")


def check_precision(precision: Any) -> None:
    """The one-line refusal, naming the fix, of a precision FSDP2 under Lightning cannot train in."""
    if str(precision) in ("16-mixed", "16"):
        raise ConfigError(
            f"trainer.precision={precision} cannot train with FSDP (Lightning's ModelParallelStrategy has no fp16 "
            "gradient scaler for sharded gradients): use trainer.precision=bf16-mixed (Ampere or newer GPUs), or "
            "trainer=ddp for fp16 on older GPUs")
    if str(precision) not in _PARAM_DTYPES:
        raise ConfigError(f"trainer.precision={precision} is not supported with FSDP: use one of {sorted(_PARAM_DTYPES)}")


def check_trainer(trainer: Any, ckpt_path: str | None = None) -> None:
    """Refuse at start-up, before any model or data is built, what Lightning would refuse later (or hang on).

    ``trainer``: the ``trainer`` config node; ``ckpt_path``: the checkpoint the run resumes, if any."""
    from ldm.io.sharded_checkpoint import is_sharded_checkpoint

    target = _strategy_target(trainer)
    fsdp = is_fsdp(trainer)
    if fsdp:
        check_precision(trainer.get("precision", "32-true"))
    elif target.endswith("FSDPStrategy") or target == "fsdp":
        if str(trainer.get("accelerator")) == "cpu":
            raise ConfigError("Lightning's FSDPStrategy (FSDP1) requires a GPU: on the CPU use trainer=fsdp_sim "
                              "(FSDP2 through ModelParallelStrategy)")
    if ckpt_path is not None and is_sharded_checkpoint(ckpt_path) and not fsdp:
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a distributed (sharded) checkpoint, which resumes under FSDP only: use "
            "trainer=fsdp (any number of GPUs) or trainer=fsdp_sim trainer.devices=1 on the CPU")


def _strategy_target(trainer: Any) -> str:
    strategy = trainer.get("strategy") if hasattr(trainer, "get") else None
    return str(strategy.get("_target_", "") if hasattr(strategy, "get") else strategy or "")


def is_fsdp(trainer: Any) -> bool:
    """Whether the ``trainer`` config node shards with FSDP2 (trainer=fsdp / fsdp_sim)."""
    return _strategy_target(trainer).endswith(_FSDP_STRATEGIES)


def mixed_precision_policy(precision: str):
    """FSDP2's ``MixedPrecisionPolicy`` for Lightning's ``trainer.precision`` (see ``_PARAM_DTYPES``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    check_precision(precision)
    param_dtype = _PARAM_DTYPES[str(precision)]
    reduce_dtype = torch.float32 if str(precision).startswith(("bf16", "16")) else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def shard_module(module: nn.Module, mesh, unit_names: Iterable[str], mp_policy=None,
                 compile_mode: str | None = None) -> None:
    """``fully_shard`` every submodule whose class name is in ``unit_names`` (each is one all-gather in
    forward and one reduce-scatter in backward), then the module itself for the parameters left over.

    ``compile_mode``: ``torch.compile`` each unit first, in place (``nn.Module.compile``: state-dict keys are
    unchanged). Per block, not the whole module: the blocks repeat, so one compiled graph serves them all, and
    FSDP's all-gather/reduce-scatter hooks stay outside the compiled region (dynamo skips FSDP hooks), where FSDP
    prefetches the next unit's weights. The order matters: compiled before sharding (torchtitan's order)."""
    from torch.distributed.fsdp import fully_shard

    names = set(unit_names)
    units = [sub for sub in module.modules() if sub is not module and type(sub).__name__ in names]
    if compile_mode is not None:
        inside = {id(m) for unit in units for m in unit.modules() if m is not unit}
        for unit in units:
            if id(unit) not in inside:  # an enclosing unit's graph already holds it
                unit.compile(mode=compile_mode)
    # Innermost first: an enclosing unit must not take its inner units' parameters into its own group.
    for unit in reversed(units):
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy or _default_policy())
    fully_shard(module, mesh=mesh, mp_policy=mp_policy or _default_policy())


def _default_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy()


def unit_policies(module: nn.Module) -> dict[str, Any]:
    """The mixed-precision policy of every FSDP unit in ``module``, by module name ("" = the module)."""
    from torch.distributed.fsdp import FSDPModule

    return {name: sub._get_fsdp_state()._mp_policy for name, sub in module.named_modules() if isinstance(sub, FSDPModule)}


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


def full_state_dict(module: nn.Module, only_rank0: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of a module, sharded or not. Collective under FSDP: every rank must call it.

    The sharded tensors are gathered one at a time and moved to the CPU at once, so an accelerator holds at most
    one full tensor beyond its shards. ``only_rank0``: the other ranks drop each gathered tensor (they return
    only the unsharded ones), so only rank 0 holds the whole state, in CPU memory."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    keep = not only_rank0 or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            full = value.full_tensor()
            if keep:
                out[key] = full.cpu()
            del full
        else:
            out[key] = value
    return out


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every device data parallel (FSDP2 alone, no tensor
    parallelism) whatever the number of devices and nodes: its own ``data_parallel_size="auto"`` would
    mean one data-parallel rank per node.

    Checkpoints are distributed (DCP) folders by default (:mod:`ldm.io.sharded_checkpoint`): written by all
    ranks at once, each its own shards, replaced atomically, and resumable under another world size.
    ``save_distributed_checkpoint=false`` gathers the full state on rank 0 instead (one file, ~16 bytes per
    parameter of rank 0's memory with AdamW)."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        from ldm.io.sharded_checkpoint import partial_path, replace_with

        path = Path(self.broadcast(str(filepath)))
        partial = partial_path(path)
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shards and rank 0's meta.pt are on disk
        if self.is_global_zero:
            replace_with(partial, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from ldm.io.sharded_checkpoint import is_sharded_checkpoint, load_sharded

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        # Lightning's own loader asks DCP for every key of the module, frozen ones included, which our
        # checkpoints omit (LatentDiffusionModule.on_save_checkpoint): load what the checkpoint holds.
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        meta = load_sharded(path, self.lightning_module, optimizers)
        # Weights and optimizer state are loaded; on_load_checkpoint still sees the omitted-keys record.
        return {**meta, "state_dict": {}}

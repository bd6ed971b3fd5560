"""FSDP without a full copy of the backbone per rank: ranks other than 0 build it on the meta device (shapes,
no memory), shard it, allocate only their shards, and receive the initial weights from rank 0 one tensor at a
time; the EMA copy is sharded empty and filled from the live shards.

Rank 0 alone builds the backbone for real, exactly as a single-process or DDP run does (same seed, same random
draws, ``init=`` loaded there): that is what makes an FSDP run start from the same weights. So rank 0 holds
the full backbone while the run starts, as every rank of a DDP run does, until it is broadcast. Every other rank
allocates 1/world of (backbone + EMA), plus one full tensor in flight while it is broadcast. Resuming a
distributed checkpoint then overwrites the shards in place (DCP reads each rank's slices only).
What stays whole on every rank, as under DDP: the frozen first stage and the conditioner.

The EMA copy is built on the meta device on every rank (``EMAConfig.copy_on_meta``, set by ldm-train): rank 0
holds one full backbone while the run starts, never two. A resume (``ckpt_path``) of an ordinary run builds
the backbone empty on every rank, rank 0 included: the checkpoint sets every tensor, so no rank ever holds a
full copy. Those shards are filled with NaN until the checkpoint is loaded, and :func:`check_filled` refuses to
train if any tensor was not in it (Lightning's sharded load is not strict).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ldm.lit import sharding


def empty_backbone_config(cfg: DictConfig) -> None:
    """Make ``stage.module`` build its backbone on the meta device (a rank other than 0 under FSDP). Called
    after ``config.yaml`` is written: the recorded config stays the user's."""
    node = OmegaConf.to_container(cfg.stage.module.model.backbone, resolve=True)
    # Not recursive: the node itself is instantiated under the meta device (init= builds the backbone right there).
    cfg.stage.module.model.backbone = {"_target_": f"{__name__}.build_empty", "_partial_": True,
                                       "_recursive_": False, "node": node}


def fsdp_empty_build(cfg: DictConfig, rank0: bool, resume: bool) -> None:
    """What an FSDP run of stage 2 builds on the meta device: every EMA copy of the backbone; the backbone on
    every rank but 0, and on rank 0 too for a ``resume`` (a checkpoint sets every tensor; not for a fine-tuning
    run, whose checkpoints omit the frozen base weights that ``init=`` gives). Called after ``config.yaml`` is
    written."""
    if cfg.stage.module.get("ema") is not None:
        with open_dict(cfg.stage.module.ema):
            cfg.stage.module.ema.copy_on_meta = True
    if resume or not rank0:
        empty_backbone_config(cfg)


def build_empty(node: Any, **wired: Any) -> nn.Module:
    """The backbone the config ``node`` gives, built on the meta device: no memory, no random draws, no weights
    read. ``node`` gives a factory (called with the ``wired`` conditioning arguments) or, with init=, the backbone."""
    from hydra.utils import instantiate

    with torch.device("meta"):
        built = instantiate(node)
        return built if isinstance(built, nn.Module) else built(**wired)


def is_empty(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def shard_from_rank0(backbone: nn.Module, ema: nn.Module | None, mesh, units, policy, compile_mode: str | None,
                     device: torch.device) -> bool:
    """Shard ``backbone`` (built for real on rank 0, empty or not elsewhere) and its EMA copy ``ema`` over
    ``mesh``, allocating only this rank's shards on ``device``, all of them rank 0's values (FSDP, unlike DDP,
    does not make the ranks agree: a rank that skipped the backbone's random draws draws other values for what
    it builds next, a trained conditioner's LoRA). When rank 0 built it empty too (a resume), the shards are
    left to the checkpoint (:func:`allocate_unset`). Returns whether the values came from rank 0. Collective:
    every rank calls it."""
    if ema is not None:
        drop(ema)  # a deep copy made whole (a conditioner's); the backbone's is on meta already
    from_rank0 = rank0_built(backbone, device)
    full = initial_weights(backbone)
    sharding.shard_module(backbone, mesh, units, policy, compile_mode)
    if from_rank0:
        materialize_from_rank0(backbone, full, device)
    else:  # a resume: the checkpoint fills every shard
        allocate_unset(backbone, device)
    del full  # rank 0's full copy goes here
    if ema is not None:
        sharding.shard_module(ema, mesh, units, policy)
        fill_from(ema, backbone, device)
    return from_rank0


def rank0_built(module: nn.Module, device: torch.device) -> bool:
    """Whether rank 0 built ``module`` for real (a fresh run) rather than empty (a resume); every rank gets rank
    0's answer (collective)."""
    import torch.distributed as dist

    flag = torch.tensor(0 if is_empty(module) else 1, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag)


def allocate_unset(module: nn.Module, device: torch.device) -> None:
    """Allocate a sharded, empty ``module``'s local shards on ``device``, floating ones set to NaN: a tensor the
    checkpoint does not overwrite is found by :func:`check_filled` instead of training from garbage."""
    module.to_empty(device=device)
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.is_floating_point():
                sharding.local(tensor).fill_(float("nan"))


def check_filled(modules: dict[str, nn.Module], device: torch.device, source: str) -> None:
    """Refuse to train when a tensor of ``modules`` (prefix -> module, allocated by :func:`allocate_unset`) is still
    all NaN after loading ``source``: the checkpoint did not hold it. Collective (every rank raises alike)."""
    import torch.distributed as dist

    unset = [f"{prefix}.{name}" for prefix, module in modules.items()
             for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
             if tensor.is_floating_point() and sharding.local(tensor).numel()
             and bool(torch.isnan(sharding.local(tensor.detach())).all())]
    count = torch.tensor(len(unset), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    if int(count):
        from ldm.io.checkpoint_io import CheckpointError

        listed = ", ".join(unset[:6]) + (" ..." if len(unset) > 6 else "") if unset else "(on another rank)"
        raise CheckpointError(
            f"ckpt_path={source} did not set {int(count)} tensor shard(s) of the model built empty for the resume: "
            f"{listed}. Resume with a checkpoint of this run's model (its config.yaml lies beside checkpoints/)")


def initial_weights(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """What rank 0 broadcasts: references to ``module``'s full tensors (taken before sharding frees them from
    the module); None on the other ranks."""
    import torch.distributed as dist

    return None if dist.get_rank() != 0 or is_empty(module) else dict(module.state_dict())


def materialize_from_rank0(module: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Allocate a sharded ``module``'s local shards on ``device`` and fill them from rank 0's ``full`` state
    dict, one tensor at a time (collective: every rank calls it; only rank 0's ``full`` is read)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() == 0 and full is None:
        raise RuntimeError("rank 0 built the backbone empty: it must build it for real (ldm.lit.meta_init)")
    if is_empty(module):
        module.to_empty(device=device)
    else:  # rank 0's shards: on the device the broadcast runs on (NCCL: the GPU), as the other ranks' are
        module.to(device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full if full is not None else {}, options=options)
    # Buffers outside the state dict (persistent=False) are not broadcast above; they are whole on every rank.
    stated = set(module.state_dict())
    for name, buffer in module.named_buffers():
        if name not in stated:
            dist.broadcast(buffer, src=0)


def drop(module: nn.Module) -> None:
    """Free a module's memory, keeping its shapes (meta), before it is sharded and re-allocated."""
    module.to_empty(device="meta")


def fill_from(copy: nn.Module, live: nn.Module, device: torch.device) -> None:
    """Allocate the sharded, empty ``copy`` (the EMA's) and copy ``live``'s shards into it, shard by shard: no
    communication, and never a full tensor."""
    copy.to_empty(device=device)
    with torch.no_grad():
        for (name, target), (live_name, source) in zip(
                itertools.chain(copy.named_parameters(), copy.named_buffers()),
                itertools.chain(live.named_parameters(), live.named_buffers())):
            if name != live_name:
                raise RuntimeError(f"the EMA copy and the live backbone differ at {name} / {live_name}")
            sharding.local(target).copy_(sharding.local(source.detach()))

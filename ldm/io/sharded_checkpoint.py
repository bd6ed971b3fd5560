"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP): what ``trainer=fsdp`` writes by default.

A checkpoint is a folder (named like the file it replaces, ``last.ckpt``): each rank writes its own shards of
the weights, the EMA and the optimizer state (``__<rank>_0.distcp``), DCP's ``.metadata`` records every
tensor's global shape and where each piece lies, and rank 0 adds Lightning's loop/callback state
(``meta.pt``). No rank ever holds the whole state, and all ranks write at once. DCP re-slices on load, so
the folder resumes under any number of processes: each rank reads only the pieces of its new shards.

The folder is written beside its target (``.<name>.partial``) and renamed over it once every rank has
finished, so a run killed mid-save keeps its previous ``last.ckpt``.

Nothing is unpickled: ``meta.pt`` is read with ``weights_only=True``; the shards hold tensors only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Lightning's names (lightning.fabric.utilities.load._METADATA_FILENAME) and DCP's.
LIGHTNING_META = "meta.pt"
DCP_METADATA = ".metadata"
STATE_PREFIX = "state_dict."


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A finished DCP checkpoint folder (its ``.metadata`` is written last, after every rank's shards)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / LIGHTNING_META).is_file()


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def replace_with(partial: Path, path: Path) -> None:
    """Put the finished folder ``partial`` in the place of ``path`` (a folder or a file, or nothing). The old
    checkpoint is moved aside before and deleted after, so one complete checkpoint exists at every moment."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(partial, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _stored_tensors(path: str | os.PathLike) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {key[len(STATE_PREFIX):]: item for key, item in metadata.state_dict_metadata.items()
            if key.startswith(STATE_PREFIX) and isinstance(item, TensorStorageMetadata)}


def stored_shapes(path: str | os.PathLike) -> dict[str, torch.Size]:
    """Every tensor of the checkpoint's ``state_dict`` (weights, EMA, buffers) with its global shape, read from
    DCP's metadata only (no tensor data)."""
    return {key: item.size for key, item in _stored_tensors(path).items()}


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's whole ``state_dict`` (not the optimizer state) as plain CPU tensors, read in this one
    process without torch.distributed: what sampling from a checkpoint needs."""
    import torch.distributed.checkpoint as dcp

    state = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in _stored_tensors(path).items()}
    dcp.load({"state_dict": state}, checkpoint_id=str(path), no_dist=True)
    return state


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Lightning's state of a sharded checkpoint (loops, callbacks, hyper-parameters): tensors and plain data."""
    return torch.load(Path(path) / LIGHTNING_META, map_location="cpu", weights_only=True)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as :func:`ldm.io.checkpoint_io.read_checkpoint` gives a file, with shape-only (meta)
    tensors in its ``state_dict``: enough to check keys and shapes before training, for the price of two small
    files, whatever the model's size."""
    state = {key: torch.empty(shape, device="meta") for key, shape in stored_shapes(path).items()}
    return {**read_meta(path), "state_dict": state}


def load_sharded(path: str | os.PathLike, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Load a DCP checkpoint into a sharded ``module`` (and its ``optimizers``), each rank reading its own
    shards, re-sliced when the checkpoint was written by another number of processes; returns Lightning's
    state (``meta.pt``). Collective: every rank calls it.

    Tensors the checkpoint does not hold (the frozen first stage and text encoder it omits) keep the values
    the module was built with; the keys were checked at start-up (``check_resume_checkpoint``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    stored = stored_shapes(path)
    state = {key: value for key, value in get_model_state_dict(module).items() if key in stored}
    dcp.load({"state_dict": state}, checkpoint_id=str(path))
    set_model_state_dict(module, state, options=StateDictOptions(strict=False))
    for index, optimizer in enumerate(optimizers):
        optimizer_state = {f"optimizer_{index}": get_optimizer_state_dict(module, optimizer)}
        dcp.load(optimizer_state, checkpoint_id=str(path))
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[f"optimizer_{index}"])
    return read_meta(path)


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """The whole checkpoint as plain tensors (``state_dict`` and ``optimizer_<i>``), read in one process without
    torch.distributed: for inspection, tests and conversion, not for training (it holds everything)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/full.pt")
        return torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=True)

"""Lightning checkpoints that survive crashes, and resume checkpoints checked before training starts.

``AtomicCheckpointIO`` is Lightning's ``TorchCheckpointIO`` with the write made atomic and durable: the
checkpoint goes to a temporary file beside its target, is fsynced, and is renamed over the target
(``ldm.io.export.atomic_path``). A process killed with SIGKILL half-way through a save, or a disk that
fills up, therefore leaves the previous ``last.ckpt`` in place, never a truncated one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from torch import nn

from ldm.io.export import atomic_path, state_mismatches

# The state-dict prefix only a LightningModule of that stage has (the stage 2 module also holds the frozen
# autoencoder, under model.first_stage.autoencoder.*).
STAGE_KEY_PREFIXES = {"vae": "autoencoder.", "ldm": "model.backbone."}
_READ_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError)


class CheckpointError(ValueError):
    """A checkpoint cannot be read, does not fit this run, or could not be written."""


def _is_local(path: str | os.PathLike) -> bool:
    protocol = get_filesystem(str(path)).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` that a killed writer left behind (atomic_path's ``.<name>.*.tmp``).

    One process writes a given checkpoint path at a time (rank 0), so any such file is an orphan; left
    alone, each SIGKILL during a save would leave a checkpoint-sized file to fill the disk.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are temp file + fsync + rename (remote paths: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as err:
            survivor = f"the previous {path.name} is intact" if path.is_file() else "no earlier checkpoint exists there"
            raise CheckpointError(
                f"could not write checkpoint {path}: {err.strerror or err}; {survivor}. "
                "Free disk space (or point paths.output_dir elsewhere) and resume with ckpt_path=last"
            ) from err

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            if _is_local(path) and map_location in (None, "cpu"):
                # Memory-mapped: the tensors are read as they are used, and the ranks of a node share the
                # file's pages instead of each holding a copy. Tensors only: nothing is unpickled.
                return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only is not False)
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint {path} does not exist") from err
        except _READ_ERRORS as err:
            raise CheckpointError(f"checkpoint {path} is not readable ({_first_line(err)}); it is truncated, corrupt "
                                  "or not a torch checkpoint: resume from another one") from err


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` of an error: torch's reader errors run on for several sentences."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    sentence = text[0].split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {sentence[:160]}"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint, memory-mapped (cheap even for large files) and never unpickling code."""
    path = Path(path)
    if path.is_dir():
        return _read_sharded(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path} does not exist (use ckpt_path=last to resume this run folder)")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except _READ_ERRORS as err:
        raise CheckpointError(
            f"ckpt_path={path} is not a readable checkpoint ({_first_line(err)}): the file is truncated, corrupt or "
            "not a torch checkpoint; resume from another one, e.g. an earlier step*.ckpt in the same folder"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) or "loops" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path={path} is not a Lightning training checkpoint (no state_dict/loops): ckpt_path resumes a run "
            "from <run>/checkpoints/*.ckpt; an export folder is loaded with first_stage.path= (stage 2) instead"
        )
    return checkpoint


def _read_sharded(path: Path) -> dict[str, Any]:
    """A distributed (DCP) checkpoint folder, as shapes only (:func:`ldm.io.sharded_checkpoint.describe`)."""
    from ldm.io.sharded_checkpoint import describe, is_sharded_checkpoint

    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"ckpt_path={path} is a folder but not a finished distributed checkpoint (no .metadata/meta.pt: the run "
            "stopped while writing it): resume from another one, e.g. an earlier step*.ckpt in the same folder")
    try:
        return describe(path)
    except _READ_ERRORS as err:
        raise CheckpointError(f"ckpt_path={path} is not a readable distributed checkpoint ({_first_line(err)}): "
                              "resume from another one") from err


def checkpoint_stage(state_dict: dict[str, Any]) -> str | None:
    for stage, prefix in STAGE_KEY_PREFIXES.items():
        if any(key.startswith(prefix) for key in state_dict):
            return stage
    return None


# Frozen parts (a stage-2 model's first stage, a frozen text encoder) are not stored in every checkpoint: a
# checkpoint lists their keys here and a fingerprint of their weights, and they are taken from the model
# rebuilt from the run's config (the export / pretrained weights they came from).
OMITTED_KEYS = "frozen_state_omitted"
OMITTED_HASH = "frozen_state_sha256"


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Of the whole tensors: a frozen part sharded by FSDP (a LoRA base) is gathered, so every rank must call it
    (as on_save_checkpoint does), and the hash is the same whatever the world size."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        digest.update(name.encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def omit_frozen_state(checkpoint: dict[str, Any], frozen: dict[str, torch.Tensor], fingerprint: str) -> None:
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
    checkpoint[OMITTED_KEYS] = sorted(frozen)
    checkpoint[OMITTED_HASH] = fingerprint


def restore_frozen_state(checkpoint: dict[str, Any], module: nn.Module, fingerprint: Any = None) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, completed with the frozen tensors it omitted, taken from ``module``.

    ``fingerprint`` (a callable giving the hash of ``module``'s frozen tensors) is compared with the one the
    checkpoint recorded, so a first-stage export rewritten since the checkpoint was taken fails loudly."""
    state = dict(checkpoint["state_dict"])
    omitted = checkpoint.get(OMITTED_KEYS) or []
    if not omitted:
        return state
    own = module.state_dict()
    missing = [k for k in omitted if k not in own]
    if missing:
        raise CheckpointError(f"the checkpoint omits frozen weights this model does not have: {missing[:6]}")
    if fingerprint is not None and checkpoint.get(OMITTED_HASH) not in (None, fingerprint()):
        raise CheckpointError(
            "the frozen parts this checkpoint was trained with (first stage, frozen text encoder) differ from the "
            "ones this run loaded: the export at first_stage.path (or the encoder's weights) changed since; point "
            "first_stage.path at the export the run was started with"
        )
    state.update({k: own[k] for k in omitted})
    return state


def check_resume_checkpoint(path: str | os.PathLike, module: nn.Module, stage: str) -> None:
    """Fail before training when ``path`` cannot resume ``module`` (stage ``stage``): wrong stage, other keys
    or shapes. Lightning would only find out after data set-up, with a raw state-dict error."""
    checkpoint = read_checkpoint(path)
    upgrade_checkpoint_keys(checkpoint)
    state = restore_frozen_state(checkpoint, module, getattr(module, "frozen_fingerprint", None))
    found = checkpoint_stage(state)
    if found is not None and found != stage:
        raise CheckpointError(
            f"ckpt_path={path} is a stage={found} checkpoint, but this run is stage={stage}: resume with a "
            f"checkpoint of an `ldm-train stage={stage}` run (or set stage={found})"
        )
    problems = state_mismatches(module, state, limit=6)
    if not problems:
        return
    lines = [f"ckpt_path={path} does not fit this run's {type(module).__name__}:", *problems]
    lines.append("  resume with the model options of the run that wrote it (its config.yaml lies beside checkpoints/)")
    raise CheckpointError("\n".join(lines))


def newest_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The most recent of ``<run>/checkpoints/last.ckpt`` and the ``hpc_ckpt_*.ckpt`` that Lightning's SLURM
    requeue handler writes into the run folder (files, or distributed-checkpoint folders under FSDP); None when
    there is neither."""
    run_dir = Path(run_dir)
    from ldm.io.sharded_checkpoint import is_sharded_checkpoint

    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
                  if p.is_file() or is_sharded_checkpoint(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


# Checkpoints written before the model layer (ldm.model) kept the parts at the top of the module.
_OLD_PREFIXES = {"unet.": "model.backbone.", "conditioner.": "model.conditioner.", "first_stage.": "model.first_stage."}


def upgrade_checkpoint_keys(checkpoint: dict[str, Any]) -> None:
    """Rename an older checkpoint's ``unet.*``/``conditioner.*``/``first_stage.*`` keys (and its list of omitted
    frozen keys) to today's ``model.*`` layout, in place, so runs from before the model layer still resume."""
    def renamed(key: str) -> str:
        for old, new in _OLD_PREFIXES.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key

    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and any(k.startswith(tuple(_OLD_PREFIXES)) for k in state):
        checkpoint["state_dict"] = {renamed(k): v for k, v in state.items()}
    if isinstance(checkpoint.get(OMITTED_KEYS), list):
        checkpoint[OMITTED_KEYS] = [renamed(k) for k in checkpoint[OMITTED_KEYS]]

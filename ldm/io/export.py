"""Export folders: ``model.safetensors`` + the resolved ``config.yaml`` + ``meta.json``.

An export is what everything downstream of training loads (stage 2 loads a stage-1 export, the
sampling and evaluation CLIs load a stage-2 export) without Lightning and without unpickling anything.
Every file is written atomically, so a killed process never leaves a half-written export in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm.errors import ExportError  # noqa: F401  (re-exported)

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one,
    also when the writer is killed (SIGKILL) or the disk fills up half-way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses shared storage and non-contiguous views; exports own their memory.
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(owned, str(tmp))


# safetensors lays tensors out by dtype, in the descending order of its (Rust) Dtype enum, then by name.
_SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                       torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
                       torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(_SAFETENSORS_DTYPES)}


def save_tensors_streamed(path: str | os.PathLike, tensors: dict[str, torch.Tensor], write: bool = True) -> None:
    """The file ``save_tensors_atomic`` writes, byte for byte, written one tensor at a time: ``tensors`` may hold
    DTensors (FSDP shards), each gathered only when its bytes are written, so the writer never holds more than
    one full tensor. The header (names, dtypes, shapes, offsets) comes from the DTensors' metadata, ungathered.

    Collective where ``tensors`` holds DTensors: every rank calls it with the same keys (the gathers run in the
    same order everywhere); only a rank with ``write`` writes the file."""
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _DTYPE_RANK})
    if unknown:
        raise ExportError(f"safetensors cannot store {unknown}: cast these tensors before exporting them")
    order = sorted(tensors, key=lambda k: (-_DTYPE_RANK[tensors[k].dtype], k))
    header, offset = {}, 0
    for key in order:
        size = tensors[key].numel() * tensors[key].element_size()  # a DTensor's numel is the global one
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensors[key].dtype], "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header with spaces to 8 bytes
    if not write:
        for key in order:
            _full(tensors[key])
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key in order:
            f.write(_full(tensors[key]).detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def save_export(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict | DictConfig,
    meta: dict[str, Any],
    write: bool = True,
) -> Path:
    """Write an export folder. ``config`` holds ``_target_`` nodes; ``meta`` must name a ``kind``.

    ``tensors`` may hold FSDP shards (DTensors): every rank then calls this, and only the one with ``write``
    writes, gathering one tensor at a time (``save_tensors_streamed``)."""
    if "kind" not in meta:
        raise ValueError("export meta must name its kind ('autoencoder' or 'ldm')")
    folder = Path(folder)
    if not write:
        save_tensors_streamed(folder / WEIGHTS, tensors, write=False)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    save_tensors_streamed(folder / WEIGHTS, tensors)
    write_text_atomic(folder / CONFIG, OmegaConf.to_yaml(OmegaConf.create(config)))
    # meta.json is written last: its presence marks a complete export.
    write_text_atomic(folder / META, json.dumps(meta, indent=2, sort_keys=True))
    return folder


def read_export(folder: str | os.PathLike, kind: str | None = None):
    """Read (tensors, config, meta) of an export folder, failing with a message that names the fix."""
    if folder is None or str(folder) in ("", "None", "null"):
        raise ExportError(
            "no export folder given: set first_stage.path=<stage-1 run>/export "
            "(the folder `ldm-train stage=vae` prints at the end)"
        )
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"export folder {folder} does not exist (expected a folder holding {WEIGHTS})")
    for name in (WEIGHTS, CONFIG, META):
        if not (folder / name).is_file():
            raise ExportError(f"export folder {folder} is incomplete: {name} is missing")
    meta = json.loads((folder / META).read_text())
    if kind is not None and meta.get("kind") != kind:
        raise ExportError(f"{folder} is an export of kind {meta.get('kind')!r}, but a {kind!r} export is needed")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except SafetensorError as err:
        raise ExportError(f"{folder / WEIGHTS} is not a readable safetensors file: {err}") from err
    config = OmegaConf.load(folder / CONFIG)
    return tensors, config, meta


def state_mismatches(module: torch.nn.Module, tensors: dict[str, torch.Tensor], limit: int = 8) -> list[str]:
    """Lines naming what of ``tensors`` does not fit ``module``: missing, unexpected, wrong shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shape = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    lines = []
    if missing:
        lines.append(f"  missing ({len(missing)}): {missing[:limit]}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:limit]}")
    for k in shape[:limit]:
        lines.append(f"  shape of {k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}")
    return lines


def load_state_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a report that lists what did not match."""
    problems = state_mismatches(module, tensors)
    if problems:
        raise ExportError("\n".join([f"weights in {source} do not fit {type(module).__name__}:", *problems]))
    module.load_state_dict(tensors, strict=True)


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def load_autoencoder(folder: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a stage-1 export as a frozen autoencoder, with its meta (latent statistics)."""
    tensors, config, meta = read_export(folder, kind="autoencoder")
    autoencoder = instantiate(config.autoencoder)
    load_state_strict(autoencoder, tensors, str(folder))
    return frozen(autoencoder), meta


def export_latent_channels(folder: str | None, default: int) -> int:
    """Latent channels of a stage-1 export (for config interpolation); ``default`` if none is set."""
    if folder is None or str(folder) in ("", "None", "null"):
        return int(default)
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        raise ExportError(f"first_stage.path={folder} is not an export folder (no {META})")
    return int(json.loads(meta_path.read_text())["latent_channels"])

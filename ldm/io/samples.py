"""Sample sets on disk in the evaluators' formats: ``samples.npz`` with ``arr_0`` uint8 NHWC (the ADM/DiT
evaluator convention) plus ``labels`` and/or ``prompts``, and ``manifest.json`` with the settings and the seed.

Large sets never pass through one process's memory: every rank writes its rows into a part file
(:class:`PartWriter`, an ``.npy`` filled batch by batch), rank 0 joins the parts into ``samples.npz``
(:func:`join_parts`, copied a block at a time), and readers map ``arr_0`` instead of loading it
(:func:`open_images`).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm import distributed
from ldm.io.export import atomic_path, write_text_atomic
from ldm.model.sharded import SampleBatch, batch_size_of, rank_batches, sample_stream, uint8_nhwc

# Rows copied at a time when parts are joined: bounds the joining process's memory, not the set's size.
JOIN_BLOCK_BYTES = 64 << 20


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C) numpy."""
    return uint8_nhwc(images).cpu().numpy()


def _extra_arrays(extra: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.cpu() if torch.is_tensor(v) else v) for k, v in extra.items() if v is not None}


def save_samples_npz(path: str | Path, images: torch.Tensor | np.ndarray, **extra: Any) -> Path:
    """``arr_0`` uint8 NHWC (float NCHW in [-1, 1] is converted) plus e.g. ``labels`` (int64) or ``prompts``
    (unicode), atomically. For sets that fit in memory; large ones go through :class:`PartWriter`."""
    arrays = {"arr_0": images if isinstance(images, np.ndarray) else to_uint8_nhwc(images), **_extra_arrays(extra)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


class PartWriter:
    """One rank's rows of a sample set, ``rows`` uint8 NHWC images written batch by batch into an ``.npy``
    (memory-mapped, so the process holds one batch at a time). ``close()`` renames it into place."""

    def __init__(self, path: str | Path, rows: int) -> None:
        self.path, self.rows, self.written = Path(path), int(rows), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp.npy")  # np.save keeps a name ending in .npy
        self._array: np.memmap | None = None

    def write(self, images: torch.Tensor | np.ndarray) -> None:
        batch = images.numpy() if torch.is_tensor(images) else np.asarray(images)
        if self._array is None:
            self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8,
                                                    shape=(self.rows, *batch.shape[1:]))
        if self.written + len(batch) > self.rows:
            raise ValueError(f"{self.path.name}: {self.written + len(batch)} rows written into {self.rows}")
        self._array[self.written : self.written + len(batch)] = batch
        self.written += len(batch)

    def close(self) -> Path:
        if self.written != self.rows:
            raise ValueError(f"{self.path.name}: {self.written} of {self.rows} rows were written")
        if self._array is None:  # a rank with no rows: an empty part, its image shape unknown
            np.save(self._tmp, np.zeros((0, 0, 0, 0), dtype=np.uint8))
        else:
            self._array.flush()
            self._array = None
        self._tmp.replace(self.path)
        return self.path


def join_parts(path: str | Path, parts: list[Path], **extra: Any) -> Path:
    """``samples.npz`` whose ``arr_0`` is the rows of ``parts`` in order, plus ``extra`` arrays; copied a
    block at a time (the joining process never holds a whole part), written atomically."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    shapes = {a.shape[1:] for a in arrays if len(a)}
    if len(shapes) != 1:
        raise ValueError(f"the parts {[p.name for p in parts]} hold images of shapes {sorted(shapes)}")
    (image_shape,) = shapes
    total = sum(len(a) for a in arrays)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (total, *image_shape)}
    block = max(1, JOIN_BLOCK_BYTES // max(1, int(np.prod(image_shape))))
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for array in arrays:
                for start in range(0, len(array), block):
                    member.write(np.ascontiguousarray(array[start : start + block]).tobytes())
        for key, value in _extra_arrays(extra).items():
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    del arrays
    return Path(path)


def open_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of an ``.npz`` memory-mapped (read-only) when it is stored uncompressed, as ``np.savez``
    and :func:`join_parts` write it: slicing reads only those rows. A compressed archive is loaded."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("arr_0.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as stored:
            return stored["arr_0"]
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the member's local header: its name and extra field come next
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if fortran_order or dtype.hasobject:
        with np.load(path, allow_pickle=False) as stored:
            return stored["arr_0"]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def write_manifest(path: str | Path, settings: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True, default=str))


def part_path(path: Path, rank: int, world: int) -> Path:
    return path.parent / f".{path.stem}.parts" / f"rank{rank:05d}-of-{world:05d}.npy"


def sample_to_npz(model: Any, conditions: dict[str, Any], image_size: int, seed: int, path: str | Path,
                  batch_size: int = 256, on_batch: Callable[[SampleBatch], None] | None = None,
                  **sample_kwargs: Any) -> Path:
    """Draw the set across the ranks into ``path`` (``samples.npz``: ``arr_0`` uint8 NHWC in the order of
    ``conditions``, plus ``labels``/``prompts``). Each rank writes its rows to a part file beside it and calls
    ``on_batch`` with each batch (PNG files, features); rank 0 joins the parts by streaming. Every rank must
    call it; the folder must be one all ranks see (as for checkpoints)."""
    path = Path(path)
    rank, world = distributed.rank(), distributed.world_size()
    n = batch_size_of(conditions)
    mine, _ = rank_batches(n, batch_size)
    rows = max(0, min(n, mine.stop * batch_size) - mine.start * batch_size)
    writer = PartWriter(part_path(path, rank, world), rows)
    for batch in sample_stream(model, conditions, image_size, seed, batch_size, **sample_kwargs):
        writer.write(batch.images)
        if on_batch is not None:
            on_batch(batch)
    writer.close()
    distributed.barrier()

    def join() -> str:
        parts = [part_path(path, r, world) for r in range(world)]
        join_parts(path, parts, labels=conditions.get("label"), prompts=conditions.get("caption"))
        shutil.rmtree(parts[0].parent, ignore_errors=True)
        return str(path)

    return Path(distributed.on_rank_zero(join, f"joining the sample parts into {path}"))

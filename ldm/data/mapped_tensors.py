"""Memory-mapped read access to the tensors of a safetensors file, for datasets larger than a rank's RAM.

``safetensors.torch.load_file`` reads every tensor into memory, once per rank (and per spawned worker).
Here each tensor is an ``np.memmap`` over its bytes in the file: the OS pages in only the rows a batch
touches, and the processes of a node share those pages. The maps are opened lazily in each process (a
pickled dataset, e.g. sent to a spawned DataLoader worker, carries only the path).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

# safetensors dtype names -> numpy dtypes (the ones a latent cache stores).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


class MappedTensors:
    """``tensors[name][rows]`` -> a torch tensor copied out of the memory map (only those rows are read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._data_start, self._header = read_header(self.path)
        unsupported = {v["dtype"] for v in self._header.values()} - set(_DTYPES)
        if unsupported:
            raise ValueError(f"{self.path}: dtypes {sorted(unsupported)} cannot be memory-mapped here")
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def names(self) -> list[str]:
        return sorted(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def __getitem__(self, name: str) -> np.memmap:
        if name not in self._maps:
            info = self._header[name]
            start, _ = info["data_offsets"]
            self._maps[name] = np.memmap(self.path, dtype=_DTYPES[info["dtype"]], mode="r",
                                         offset=self._data_start + start, shape=tuple(info["shape"]))
        return self._maps[name]

    def rows(self, name: str, index: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(self[name][index]))  # a copy: the map is read-only

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

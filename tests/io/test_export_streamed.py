"""save_tensors_streamed writes the very bytes of safetensors' own save_file (every dtype an export holds, in
safetensors' order), from plain tensors and from FSDP shards (DTensors on a 1-rank gloo mesh)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ldm.errors import ExportError
from ldm.io.export import save_tensors_streamed

TENSORS = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(5), "scale": torch.tensor(0.18),
           "half": torch.randn(4, dtype=torch.float16), "brain": torch.randn(2, 3, dtype=torch.bfloat16),
           "steps": torch.tensor(7), "ids": torch.arange(6, dtype=torch.int32), "mask": torch.tensor([True, False]),
           "bytes": torch.arange(3, dtype=torch.uint8), "double": torch.randn(2, dtype=torch.float64),
           "empty": torch.zeros(0, 4), "z": torch.randn(1)}


def test_the_streamed_file_is_save_files_bytes(tmp_path):
    save_file(TENSORS, str(tmp_path / "reference.safetensors"))
    save_tensors_streamed(tmp_path / "streamed.safetensors", TENSORS)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "streamed.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_a_rank_that_does_not_write_leaves_no_file_and_an_unstorable_dtype_is_refused(tmp_path):
    save_tensors_streamed(tmp_path / "none.safetensors", TENSORS, write=False)
    assert not (tmp_path / "none.safetensors").exists()
    with pytest.raises(ExportError, match="complex64"):
        save_tensors_streamed(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_sharded_tensors_are_gathered_into_the_same_bytes(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() and v.is_floating_point() else v
                   for k, v in TENSORS.items()}
        save_tensors_streamed(tmp_path / "sharded.safetensors", sharded)
    finally:
        dist.destroy_process_group()
    save_file(TENSORS, str(tmp_path / "reference.safetensors"))
    assert (tmp_path / "sharded.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()

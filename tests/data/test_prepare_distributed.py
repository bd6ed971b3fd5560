"""``ldm-prepare encode=true`` under torchrun: 2 gloo processes through the real CLI write the same shards as
one process, each source slice encoded by exactly one rank, the images decoded in DataLoader workers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_stream_encode  # noqa: E402
from test_stream import prepare_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
export, images = test_stream_encode.export, test_stream_encode.images  # fixtures, shared
# 12 images in 2 slices of 6, encoded 5 at a time; caption embeddings of the frozen text encoder stored as fp16.
COMMON = [*test_stream_encode.ENCODE, "cond=text", "encode_settings.embedding_dtype=float16"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


@pytest.mark.slow
@pytest.mark.timeout(900)
def prepare_cli(images: Path, out: Path, export: Path, processes: int) -> str:
    """``ldm-prepare`` in 1 plain process or under torchrun, one thread each (the same numerics either way)."""
    args = [f"source.root={images}", f"output={out}", "source.labels_from_subfolders=true", "source.samples_per_shard=6",
            "chunk_bytes=6000", *COMMON, f"first_stage.path={export}", "num_workers=1", f"hydra.run.dir={out}-log"]
    launch = ["-m", "torch.distributed.run", f"--nproc-per-node={processes}", f"--master-port={free_port()}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *(launch if processes > 1 else []), "-m", "ldm.prepare", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_torchrun_ranks_encode_each_slice_once_into_the_shards_of_one_process(images, export, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    prepare_cli(images, one, export, 1)
    output = prepare_cli(images, two, export, 2)
    # Each slice was encoded once, by the rank it belongs to (every WORLD_SIZE-th slice), on that rank's device.
    written = re.findall(r"shard (\d+): 6 samples encoded on cpu by rank (\d) of 2", output)
    assert sorted(written) == [("0", "0"), ("1", "1")]
    assert output.count("ldm-prepare: 12 samples in 2 shards") == 2  # both ranks report the whole folder
    index = json.loads((two / "index.json").read_text())
    assert index["ldm"]["encode"]["text_encoder"]["embedding_dtype"] == "float16"

    assert shard_files(two) == shard_files(one) and len(shard_files(one)) >= 2
    index_one, index_two = (json.loads((f / "index.json").read_text()) for f in (one, two))
    index_one.pop("updated_at"), index_two.pop("updated_at")
    assert index_two == index_one


def test_caption_embeddings_can_be_stored_as_float16(images, export, tmp_path):
    from test_stream import datamodule

    half = tmp_path / "half"
    prepare_shards(images, half, *COMMON, f"first_stage.path={export}", "encode_settings.flips=false")
    full = tmp_path / "full"
    prepare_shards(images, full, *test_stream_encode.ENCODE, "cond=text", f"first_stage.path={export}",
                   "encode_settings.flips=false")
    size = {f: sum(len(b) for b in shard_files(f).values()) for f in (half, full)}
    # 12 embeddings of 32 x 384 values: 2 bytes each instead of 4
    assert size[full] - size[half] == 12 * 32 * 384 * 2
    a, b = (next(iter(datamodule(f, random_flip=False).train_dataloader())) for f in (half, full))
    assert a["caption_embedding"].dtype == b["caption_embedding"].dtype == torch.float32  # read back as fp32
    np.testing.assert_allclose(a["caption_embedding"].numpy(), b["caption_embedding"].numpy(), rtol=1e-3, atol=1e-3)
    assert not np.array_equal(a["caption_embedding"].numpy(), b["caption_embedding"].numpy())

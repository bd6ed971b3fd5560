"""FSDP without a full copy per rank, measured by traced memory (ldm.lit.traced_memory) on 2 gloo processes
through ``benchmarks/fsdp_memory.py``: at setup (ldm.lit.meta_init) a rank other than 0 allocates about 1/2 of
(backbone + EMA) and never a full copy, where the old path builds both whole on every rank, and the shards
gathered back equal rank 0's seeded build bit for bit; rank 0 never builds the EMA copy whole, and on a resume
no rank builds anything whole; at export (ldm.io.export.save_tensors_streamed) rank 0
holds one tensor at a time, where gathering first holds the whole state, and both files are the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]


def measured(out: Path, *flags: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp_memory.py"), "--model", "dit_tiny",
                           "--world", "2", "--out", str(out), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mode = "full" if "--full" in flags else "resume" if "--resume" in flags else "sharded"
    return [json.loads((out / f"{mode}_rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow  # three pairs of processes: ~60 s on a quiet 2-core machine
def test_setup_and_export_never_hold_the_full_state_where_the_old_path_does(tmp_path):
    zero, one = measured(tmp_path, "--check")
    old_zero, old_one = measured(tmp_path, "--full")
    pair = one["model_and_ema"]  # the full backbone + its EMA copy, fp32
    assert zero["equal"] == one["equal"] == [True, True]  # backbone, EMA
    # Setup: rank 1 ends with its shards of both (FSDP pads a shard to the same size on every rank) and never
    # held more than them plus a tensor in flight; the old path held both whole.
    assert abs(one["held_after"] - one["local_weights"]) < 0.01 * pair
    assert 0.45 * pair < one["local_weights"] < 0.55 * pair
    assert one["setup_peak"] < 0.6 * pair and one["setup_allocated"] < 1.1 * pair
    assert old_one["setup_peak"] >= pair
    # Rank 0 built the backbone whole (its seeded draws are the DDP run's), never its EMA copy (built on meta):
    # one full backbone plus its shards at most, where the old path held both whole; it ends on its shards.
    assert old_zero["setup_peak"] >= pair
    assert zero["setup_peak"] < 0.8 * pair and zero["held_after"] < 0.55 * pair
    # Export: rank 0 holds the tensor being written (at most two: a gather's buffers may outlive its tensor until
    # the next gather), against the whole state gathered first.
    assert zero["export_peak"] <= 2 * zero["largest_tensor"]
    assert old_zero["export_peak"] >= pair
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "full.safetensors").read_bytes()
    # A resume of a distributed checkpoint: every rank, 0 included, builds empty and the checkpoint fills the
    # shards (ldm.lit.meta_init.allocate_unset / check_filled): no rank ever holds a full copy, and the gathered
    # state equals the one saved.
    for rank in measured(tmp_path / "resume", "--resume", "--check"):
        assert rank["equal"] == [True, True]
        assert rank["setup_peak"] < 0.6 * pair and 0.45 * pair < rank["local_weights"] < 0.55 * pair


def test_a_tensor_the_checkpoint_did_not_set_is_refused_by_name_before_training():
    from ldm.io.checkpoint_io import CheckpointError
    from ldm.lit.meta_init import allocate_unset, check_filled

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to("meta")
    allocate_unset(model, torch.device("cpu"))
    with torch.no_grad():  # what a checkpoint holding all but the norm's bias would set
        model[0].weight.copy_(torch.randn(4, 3))
        model[0].bias.copy_(torch.randn(4))
        model[1].weight.copy_(torch.randn(4))
        model[1].bias.copy_(torch.randn(4))
        model[1].bias[0] = float("nan")  # a tensor with some NaN is a broken checkpoint's, not an unset one
    check_filled({"model": model}, torch.device("cpu"), "ckpt")
    model[1].bias.data.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"ckpt_path=ckpt did not set 1 tensor.*model\.1\.bias"):
        check_filled({"model": model}, torch.device("cpu"), "ckpt")

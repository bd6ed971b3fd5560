"""FSDP without a full copy per rank (ldm.lit.meta_init), measured by traced memory (ldm.lit.traced_memory) on 2
gloo processes through ``benchmarks/fsdp_memory.py``: a rank other than 0 allocates about 1/2 of (backbone + EMA)
and never a full copy, where the old path (every rank builds both whole) allocates both; and the sharded
backbone and EMA gathered back equal rank 0's seeded build bit for bit (the same values, only moved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def setup_bytes(*flags: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp_memory.py"), "--model", "dit_tiny",
                           "--world", "2", *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(records, key=lambda r: r["rank"])


@pytest.mark.slow  # two pairs of processes: ~40 s on a quiet 2-core machine
def test_a_rank_other_than_0_allocates_half_of_model_and_ema_and_the_shards_hold_rank_0s_weights():
    zero, one = setup_bytes("--check")
    pair = one["model_and_ema"]  # the full backbone + its EMA copy, fp32
    assert zero["equal"] == one["equal"] == [True, True]  # backbone, EMA
    # Rank 1 holds its shards of both, and never more than its shards plus one tensor in flight at once.
    # (held: the shards' storage, FSDP pads a shard to an equal size on every rank)
    assert abs(one["held_after"] - one["local_weights"]) < 0.01 * pair and 0.45 * pair < one["local_weights"] < 0.55 * pair
    assert one["setup_peak"] < 0.6 * pair and one["setup_allocated"] < 1.1 * pair
    # After setup rank 0 holds only its shards too (its full build is freed).
    assert zero["held_after"] < 0.55 * pair
    _, old_one = setup_bytes("--full")
    assert old_one["setup_peak"] >= pair  # the old path: both whole on every rank

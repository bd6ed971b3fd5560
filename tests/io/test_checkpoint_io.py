"""AtomicCheckpointIO: a crash, a full disk or a SIGKILL half-way through a save keeps the previous checkpoint;
and resume checkpoints are checked (readable, right stage, right shapes) with messages that name the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ldm.io.checkpoint_io as checkpoint_io
from ldm.io.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    check_resume_checkpoint,
    newest_resume_checkpoint,
    read_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]


def lightning_like(step: int, **state_dict: torch.Tensor) -> dict:
    return {"global_step": step, "state_dict": state_dict, "loops": {}, "optimizer_states": []}


def test_save_and_load_round_trip_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(lightning_like(3, w=torch.arange(4.0)), path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_write_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(lightning_like(1, w=torch.ones(3)), path)
    before = path.read_bytes()

    def half_then_disk_full(obj, target):
        with open(target, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", half_then_disk_full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*last.ckpt: No space left on device; the "
                                              "previous last.ckpt is intact. Free disk space"):
        io.save_checkpoint(lightning_like(2, w=torch.zeros(3)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    import ldm.io.checkpoint_io as checkpoint_io
    path, marker = Path(sys.argv[1]), Path(sys.argv[2])
    io = checkpoint_io.AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}, "loops": {}}, path)
    real_save = torch.save

    def slow_save(obj, target):
        real_save(obj, target)
        data = Path(target).read_bytes()
        with open(target, "wb") as f:  # a large checkpoint caught half-way through its write
            f.write(data[: len(data) // 2])
            f.flush()
            marker.touch()
            time.sleep(120)

    checkpoint_io.torch.save = slow_save
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1_000_000)}, "loops": {}}, path)
    """
)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "half-written"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(marker)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stdout.read()
        assert time.monotonic() < deadline, "the child never reached the middle of its save"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    survivor = torch.load(path, weights_only=True)
    assert survivor["global_step"] == 1 and torch.equal(survivor["state_dict"]["w"], torch.ones(3))
    orphans = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(orphans) == 1  # the half-written temporary, never renamed over last.ckpt
    # The next save clears the orphan (else every kill would leave a checkpoint-sized file behind).
    AtomicCheckpointIO().save_checkpoint(lightning_like(3), path)
    assert not list(tmp_path.glob(".last.ckpt.*.tmp")) and torch.load(path, weights_only=True)["global_step"] == 3


def test_unreadable_checkpoints_are_named_with_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save(lightning_like(1, w=torch.ones(1000)), good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:3000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"ckpt_path={bad} is not a readable checkpoint .*truncated, corrupt"):
            read_checkpoint(bad)
        with pytest.raises(CheckpointError, match="is not readable"):
            AtomicCheckpointIO().load_checkpoint(bad)
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"w": torch.ones(1)}, weights_only)
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint"):
        read_checkpoint(weights_only)
    assert read_checkpoint(good)["global_step"] == 1


class StageTwo(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.backbone = nn.Linear(width, width)


def test_a_checkpoint_of_another_stage_or_shape_is_refused(tmp_path):
    stage1 = tmp_path / "vae.ckpt"
    torch.save(lightning_like(1, **{"autoencoder.conv.weight": torch.ones(2)}), stage1)
    with pytest.raises(CheckpointError, match="is a stage=vae checkpoint, but this run is stage=ldm"):
        check_resume_checkpoint(stage1, StageTwo(), "ldm")
    narrow = tmp_path / "narrow.ckpt"
    torch.save(lightning_like(1, **StageTwo(4).state_dict()), narrow)
    check_resume_checkpoint(narrow, StageTwo(4), "ldm")  # fits
    with pytest.raises(CheckpointError, match=r"shape of model.backbone.weight: checkpoint \(4, 4\) vs model \(8, 8\)"):
        check_resume_checkpoint(narrow, StageTwo(8), "ldm")
    # a checkpoint from before the model layer (unet.*, first_stage.*) is read in today's layout
    old = tmp_path / "old.ckpt"
    torch.save(lightning_like(1, **{"unet.weight": torch.ones(4, 4), "unet.bias": torch.ones(4)}), old)
    check_resume_checkpoint(old, StageTwo(4), "ldm")


def test_ckpt_last_picks_the_newest_of_last_and_a_slurm_requeue_checkpoint(tmp_path):
    assert newest_resume_checkpoint(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert newest_resume_checkpoint(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(last, ns=(1, 1))
    assert newest_resume_checkpoint(tmp_path) == hpc


def test_frozen_state_is_omitted_from_checkpoints_and_restored_only_when_it_is_the_same():
    from ldm.io.checkpoint_io import OMITTED_KEYS, omit_frozen_state, restore_frozen_state, tensors_hash

    module = torch.nn.ModuleDict({"unet": torch.nn.Linear(2, 2), "first_stage": torch.nn.Linear(2, 3)})
    frozen = {k: v for k, v in module.state_dict().items() if k.startswith("first_stage.")}
    checkpoint = {"state_dict": dict(module.state_dict())}
    omit_frozen_state(checkpoint, frozen, tensors_hash(frozen))
    assert set(checkpoint["state_dict"]) == {"unet.weight", "unet.bias"}
    assert checkpoint[OMITTED_KEYS] == ["first_stage.bias", "first_stage.weight"]

    def fingerprint():
        return tensors_hash({k: v for k, v in module.state_dict().items() if k.startswith("first_stage.")})

    restored = restore_frozen_state(checkpoint, module, fingerprint)
    assert restored.keys() == module.state_dict().keys()
    with torch.no_grad():
        module["first_stage"].weight.add_(1.0)  # the export changed since the checkpoint was written
    with pytest.raises(CheckpointError, match="first_stage.path"):
        restore_frozen_state(checkpoint, module, fingerprint)

import os

import pytest
import torch
from torch import nn

from ldm.io.export import ExportError, atomic_path, load_state_strict, read_export, save_export


def test_export_round_trip(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_export(tmp_path / "e", tensors, {"autoencoder": {"_target_": "x.Y", "a": 1}}, {"kind": "autoencoder", "k": 2})
    loaded, config, meta = read_export(tmp_path / "e", kind="autoencoder")
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
    assert config.autoencoder.a == 1 and meta["k"] == 2


def test_wrong_kind_missing_and_corrupt_exports_fail_clearly(tmp_path):
    with pytest.raises(ExportError, match="first_stage.path"):
        read_export(None)
    with pytest.raises(ExportError, match="does not exist"):
        read_export(tmp_path / "nope")
    save_export(tmp_path / "e", {"w": torch.zeros(1)}, {}, {"kind": "ldm"})
    with pytest.raises(ExportError, match="kind 'ldm'"):
        read_export(tmp_path / "e", kind="autoencoder")
    (tmp_path / "e" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="not a readable safetensors"):
        read_export(tmp_path / "e")
    os.remove(tmp_path / "e" / "meta.json")
    with pytest.raises(ExportError, match="incomplete"):
        read_export(tmp_path / "e")


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_strict_load_reports_missing_unexpected_and_shapes():
    model = nn.Linear(2, 3)
    bad = {"weight": torch.zeros(4, 2), "extra": torch.zeros(1)}
    with pytest.raises(ExportError) as err:
        load_state_strict(model, bad, "x.safetensors")
    text = str(err.value)
    assert "missing (1): ['bias']" in text and "unexpected (1): ['extra']" in text and "(4, 2)" in text

"""The latent cache's file layer: safetensors read through memory maps, and parts joined by streaming."""

from __future__ import annotations

import pickle

import torch
from safetensors.torch import load_file, save_file

from ldm.data.latent_cache import write_concatenated
from ldm.data.mapped_tensors import MappedTensors


def test_parts_join_into_a_safetensors_file_that_reads_back_mapped_and_with_safetensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    parts = []
    for r, rows in enumerate((3, 2, 4)):
        tensors = {"mean": torch.randn(rows, 2, 4, 5, 5, generator=generator), "std": torch.rand(rows, 2, 4, 5, 5, generator=generator),
                   "label": torch.randint(0, 10, (rows,), generator=generator)}
        parts.append(tensors)
        save_file(tensors, str(tmp_path / f"p{r}.safetensors"))
    joined = tmp_path / "all.safetensors"
    write_concatenated(joined, [tmp_path / f"p{r}.safetensors" for r in range(3)])
    expected = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    loaded = load_file(str(joined))  # a valid safetensors file for the library itself
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    mapped = MappedTensors(joined)
    assert mapped.shape("mean") == (9, 2, 4, 5, 5) and "label" in mapped and "caption" not in mapped
    assert torch.equal(mapped.rows("mean", (4, 1)), expected["mean"][4, 1])
    assert torch.equal(mapped.rows("label", slice(None)), expected["label"])
    # A dataset sent to a spawned worker carries the path, not the maps, and reopens them there.
    clone = pickle.loads(pickle.dumps(mapped))
    assert clone._maps == {} and torch.equal(clone.rows("std", 8), expected["std"][8])

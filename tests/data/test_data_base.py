"""Shared data pieces: collation, per-sample seeding, the epoch sampler, uint8 geometry."""

import numpy as np
import pytest
import torch

from ldm.data.base import (
    EpochShuffleSampler,
    collate_examples,
    sample_seed,
    split_key,
    stratified_split,
)
from ldm.data.tensor_images import TensorImageDataset, fit_uint8_images, uint8_to_signed_unit


def test_collate_builds_the_shared_batch_dict():
    examples = [{"image": torch.full((1, 2, 2), float(i)), "label": i, "caption": f"c{i}"} for i in range(3)]
    batch = collate_examples(examples)
    assert batch["image"].shape == (3, 1, 2, 2)
    assert torch.equal(batch["image"][:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [0, 1, 2]
    assert batch["caption"] == ["c0", "c1", "c2"]
    assert set(collate_examples([{"image": torch.zeros(1, 2, 2)}])) == {"image"}


def test_collate_rejects_mixed_keys_and_empty():
    with pytest.raises(ValueError, match="different keys"):
        collate_examples([{"image": torch.zeros(1, 1, 1), "label": 0}, {"image": torch.zeros(1, 1, 1)}])
    with pytest.raises(ValueError, match="empty"):
        collate_examples([])


def test_sample_seed_is_deterministic_and_spread():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(100)}
    assert len(seeds) == 900  # no collisions between neighbouring (seed, epoch, index)
    assert all(0 <= s < 2**63 for s in seeds)
    assert split_key(5) == (5, 0) and split_key((5, 3)) == (5, 3)


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochShuffleSampler(50, seed=7)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first
    assert sorted(index for index, _ in first) == list(range(50))
    assert {epoch for _, epoch in first} == {2}
    sampler.set_epoch(3)
    assert [index for index, _ in sampler] != [index for index, _ in first]
    # Without set_epoch (plain loops) the epoch advances on its own.
    auto = EpochShuffleSampler(50, seed=7)
    assert {e for _, e in auto} == {0} and {e for _, e in auto} == {1}
    assert [k for k, _ in EpochShuffleSampler(4, seed=0, shuffle=False)] == [0, 1, 2, 3]


def test_stratified_split_counts_and_edge_cases():
    labels = np.repeat(np.arange(4), [10, 20, 30, 3])
    train, val = stratified_split(labels, 0.2, seed=1)
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [2, 4, 6, 1]  # round(3 * 0.2) = 1: at least one per class
    assert stratified_split(labels, 0.0, seed=1)[1].size == 0
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=1)


def test_fit_uint8_pad_is_exact_and_resize_keeps_constants():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    padded = fit_uint8_images(images, 32, "pad")
    assert padded.shape == (3, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], images)
    assert padded[:, :, :2].sum() == 0 and padded[:, :, :, 30:].sum() == 0
    constant = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(
        fit_uint8_images(constant, 16, "resize"), torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    )
    with pytest.raises(ValueError, match="resize_mode='resize'"):
        fit_uint8_images(images, 20, "pad")
    with pytest.raises(ValueError, match="resize_mode"):
        fit_uint8_images(images, 32, "stretch")


def test_uint8_maps_onto_signed_unit_range():
    values = uint8_to_signed_unit(torch.tensor([0, 255, 51], dtype=torch.uint8))
    assert torch.allclose(values, torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_tensor_dataset_flip_is_seeded_per_key():
    images = torch.arange(2 * 4, dtype=torch.uint8).reshape(1, 1, 2, 4).repeat(4, 1, 1, 1)
    dataset = TensorImageDataset(images, seed=3, random_flip=True)
    plain = uint8_to_signed_unit(images[0])
    outcomes = []
    for epoch in range(16):
        image = dataset[(0, epoch)]["image"]
        assert torch.equal(image, dataset[(0, epoch)]["image"])
        assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
        outcomes.append(torch.equal(image, plain))
    assert any(outcomes) and not all(outcomes)
    with pytest.raises(ValueError, match="caption_fn needs labels"):
        TensorImageDataset(images, caption_fn=lambda label, rng: "x")

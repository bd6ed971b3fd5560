"""ResumableDataLoader: a loader stopped after k batches and restored from its state_dict yields exactly the
batches the uninterrupted loader would have yielded next (mid-epoch, at an epoch's end, with workers)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from ldm.data.base import EpochShuffleSampler, ResumableDataLoader, collate_examples, split_key


class Keys(Dataset):
    """Returns the (index, epoch) it was asked for, so batches show the order and the epoch."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        index, epoch = split_key(key)
        return {"image": torch.tensor([float(index), float(epoch)])}


def loader(num_workers: int = 0) -> ResumableDataLoader:
    return ResumableDataLoader(
        Keys(), sampler=EpochShuffleSampler(10, seed=3), batch_size=3, drop_last=True, collate_fn=collate_examples,
        num_workers=num_workers, generator=torch.Generator().manual_seed(0),
    )


def batches(dl: ResumableDataLoader, epoch: int, limit: int | None = None) -> list[list[tuple[int, int]]]:
    """Like Lightning: iterator first, epoch set afterwards (before the first batch)."""
    it = iter(dl)
    dl.sampler.set_epoch(epoch)
    out = []
    for batch in it:
        out.append([tuple(int(v) for v in row) for row in batch["image"]])
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_state_continues_with_the_next_batch(num_workers):
    straight = batches(loader(), epoch=4)
    assert len(straight) == 3 and {e for b in straight for _, e in b} == {4}
    first = loader(num_workers)
    assert batches(first, epoch=4, limit=1) == straight[:1]
    state = first.state_dict()
    assert state["epoch"] == 4 and state["samples_consumed"] == 3 and state["num_samples"] == 10
    resumed = loader(num_workers)
    resumed.load_state_dict(state)
    assert batches(resumed, epoch=4) == straight[1:]
    # A state taken after resuming counts from the epoch's start, and the next epoch is whole again.
    assert resumed.state_dict()["samples_consumed"] == 9
    assert batches(resumed, epoch=5) == batches(loader(), epoch=5)


def test_state_at_an_epochs_end_resumes_with_the_next_epoch():
    first = loader()
    batches(first, epoch=2)  # all 3 batches; the last sample is dropped (drop_last)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert batches(resumed, epoch=3) == batches(loader(), epoch=3)


def test_the_worker_seed_generator_is_restored():
    first = loader()
    batches(first, epoch=0)
    batches(first, epoch=1, limit=1)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    # The state holds the generator as it was when epoch 1's iterator drew its workers' base seed.
    assert torch.equal(resumed.generator.get_state(), state["generator_state"])
    assert not torch.equal(state["generator_state"], torch.Generator().manual_seed(0).get_state())


def test_a_different_dataset_size_is_refused():
    first = loader()
    batches(first, epoch=0, limit=1)
    state = {**first.state_dict(), "num_samples": 11}
    with pytest.raises(ValueError, match="written with 11 training samples, this run has 10"):
        loader().load_state_dict(state)


def test_resume_position_applies_only_to_its_own_epoch():
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.resume_at(epoch=1, start=4)
    sampler.set_epoch(2)  # the checkpoint's epoch was finished after all
    assert len(list(sampler)) == 10
    sampler.resume_at(epoch=1, start=4)
    assert list(sampler) == _epoch(1)[4:]
    with pytest.raises(ValueError, match="outside this epoch"):
        sampler.resume_at(epoch=0, start=11)


def _epoch(epoch: int) -> list[tuple[int, int]]:
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_ranks_share_one_global_order_disjointly_and_a_resume_continues_each_share():
    """Data parallel: rank r takes positions r, r+W, ... of the epoch's global order, so shares are disjoint
    and together the order's first len x W samples; a mid-epoch state continues every rank's share."""
    order = [key for key in EpochShuffleSampler(10, seed=3)]  # one process, epoch 0
    shares = [list(EpochShuffleSampler(10, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert [key for round_ in zip(*shares) for key in round_] == order[:9]

    def rank_loader(rank: int, replicas: int = 2) -> ResumableDataLoader:
        sampler = EpochShuffleSampler(10, seed=3, num_replicas=replicas, rank=rank)
        return ResumableDataLoader(Keys(), sampler=sampler, batch_size=2, drop_last=True, collate_fn=collate_examples)

    for rank in (0, 1):
        straight = batches(rank_loader(rank), epoch=0)
        stopped = rank_loader(rank)
        assert batches(stopped, epoch=0, limit=1) == straight[:1]
        state = stopped.state_dict()
        assert state["num_replicas"] == 2 and state["samples_consumed"] == 2
        resumed = rank_loader(rank)
        resumed.load_state_dict(state)
        assert batches(resumed, epoch=0) == straight[1:]
    # A different world size continues at the same point of the global order (2 ranks x 2 = 4 seen).
    state = {**state, "samples_consumed": 2}
    single = ResumableDataLoader(Keys(), sampler=EpochShuffleSampler(10, seed=3), batch_size=2, drop_last=True,
                                 collate_fn=collate_examples)
    with pytest.warns(UserWarning, match="data-parallel ranks"):
        single.load_state_dict(state)
    assert [key for batch in batches(single, epoch=0) for key in batch] == order[4:]

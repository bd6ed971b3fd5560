"""Pieces shared by every DataModule: batch collation, per-sample seeding, the epoch-aware sampler,
the stratified split, in-memory tensor datasets and the DataLoader factory.

Every DataModule yields the same batch dict::

    {"image": float (B, C, H, W) in [-1, 1], "label": long (B,)  [if labelled],
     "caption": list[str]  [if captioned]}

Randomness (shuffling, flips, crops, caption phrasing) is derived from ``(seed, epoch, index)`` only, so
a batch is reproducible regardless of ``num_workers``, of resumption, and of whatever else consumed the
global RNG. The training sampler therefore yields ``(index, epoch)`` keys; datasets also accept plain
integer indices (treated as epoch 0), which is what validation loaders and Lightning's overfit/debug
samplers hand them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

SampleKey = int | tuple[int, int]
CaptionFn = Callable[[int, np.random.Generator], str]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Mix ``(seed, epoch, index)`` into one well-spread 63-bit seed (SplitMix64 finaliser).

    Neighbouring indices must not get correlated streams, hence the avalanche mixing rather than a sum.
    """
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def split_key(key: SampleKey) -> tuple[int, int]:
    """``(index, epoch)`` from a sampler key; a bare index means epoch 0 (validation, debug samplers)."""
    if isinstance(key, tuple):
        index, epoch = key
        return int(index), int(epoch)
    return int(key), 0


def sample_rng(seed: int, key: SampleKey) -> tuple[int, np.random.Generator]:
    index, epoch = split_key(key)
    return index, np.random.default_rng(sample_seed(seed, epoch, index))


def collate_values(values: Sequence[Any]) -> Any:
    """One batch entry from per-sample values: tensors stacked, integers to long, floats to float32, the rest
    (captions) kept as a list."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.stack(list(values))
    if isinstance(first, (bool, int, np.integer)):
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    if isinstance(first, (float, np.floating)):
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    return list(values)


def collate_examples(examples: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Stack per-sample dicts into the shared batch dict (see module docstring).

    keys: the condition keys to carry besides the image (a model's ``conditioner.batch_keys``); None carries
    every key the examples have. A key the model reads but the data lacks is an error naming both.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    present = set(examples[0])
    if any(set(example) != present for example in examples):
        raise ValueError(f"examples in one batch carry different keys; expected {sorted(present)} for all")
    if "image" not in present:
        raise ValueError("every example needs an 'image' tensor")
    wanted = sorted(present - {"image"}) if keys is None else list(keys)
    missing = [k for k in wanted if k not in present]
    if missing:
        raise ValueError(f"the model's conditioning reads batch keys {missing}, but this data yields only "
                         f"{sorted(present)}: pick data that has them (or a cond= that reads what it has)")
    batch: dict[str, Any] = {"image": torch.stack([example["image"] for example in examples])}
    for key in wanted:
        batch[key] = collate_values([example[key] for example in examples])
    return batch


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with a generator seeded by ``(seed, epoch)`` and yields ``(index, epoch)`` keys.

    Lightning calls :meth:`set_epoch` before every training epoch (also on resume), so the order and
    every per-sample random choice depend only on the seed and the epoch. Outside Lightning the epoch
    advances by itself after each full pass so plain loops do not replay the same order forever.

    Data parallel: rank r of W takes positions r, r + W, ... of the epoch's one global order (a last partial
    round is dropped): disjoint shares, and a position in a share maps back to one in the order. A
    ``DistributedSampler``, so Lightning keeps it instead of wrapping it in one whose position is not saved.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"EpochShuffleSampler needs at least one sample, got num_samples={num_samples}")
        if num_samples < num_replicas:
            raise ValueError(f"{num_samples} samples cannot be shared by {num_replicas} ranks")
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.num_samples_total = num_samples
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        # (epoch, first position) of the pass most recently begun; what a checkpoint records.
        self.last_pass = (0, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, start: int) -> None:
        """Begin the next pass over ``epoch`` at its ``start``-th sample of this rank's share (a mid-epoch
        resume).

        Only the pass over that very epoch is shortened, so a later ``set_epoch`` to another epoch (the
        checkpoint was taken at an epoch's end) starts that one from its beginning.
        """
        if not 0 <= start <= len(self):
            raise ValueError(f"resume position {start} is outside this epoch of {len(self)} samples")
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(start))

    def __len__(self) -> int:
        return self.num_samples_total // self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        start = 0
        if self._resume is not None:
            start = self._resume[1] if self._resume[0] == epoch else 0
            self._resume = None
        self.last_pass = (epoch, start)
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
            order = torch.randperm(self.num_samples_total, generator=generator).tolist()
        else:
            order = list(range(self.num_samples_total))
        mine = order[self.rank : len(self) * self.num_replicas : self.num_replicas]
        for index in mine[start:]:
            yield index, epoch


def data_parallel_share(datamodule: Any) -> dict[str, int]:
    """``{num_replicas, rank}`` of the data-parallel run a DataModule is attached to (1 and 0 alone)."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None or trainer.world_size <= 1:
        return {"num_replicas": 1, "rank": 0}
    kwargs = trainer.strategy.distributed_sampler_kwargs or {}
    return {"num_replicas": int(kwargs.get("num_replicas", 1)), "rank": int(kwargs.get("rank", 0))}


class ResumableDataLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch: Lightning saves its ``state_dict`` in every checkpoint
    (``loops.fit_loop.state_dict.combined_loader``) and loads it before the first batch of a resumed run.

    The state is the epoch in progress and how many of its batches were handed out, so a resumed run
    continues with the next batch instead of replaying the epoch; the skipped samples are never loaded,
    only their indices are. It also holds the loader generator's state at the start of that epoch, from
    which the workers' seeds are drawn, so worker RNG streams continue too.
    """

    def __init__(self, dataset: Dataset, sampler: EpochShuffleSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._pass = (0, 0)
        self._batches_yielded = 0
        self._generator_state: torch.Tensor | None = None

    def __iter__(self) -> Iterator[Any]:
        # Taken before the base iterator draws the workers' base seed from the generator.
        generator_state = self.generator.get_state() if self.generator is not None else None
        started = False
        for batch in super().__iter__():
            if not started:
                # Only now is the pass settled (Lightning sets the epoch after creating the iterator);
                # until then the state still describes the previous pass.
                started = True
                self._pass = self.sampler.last_pass if isinstance(self.sampler, EpochShuffleSampler) else (0, 0)
                self._generator_state = generator_state
                self._batches_yielded = 0
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, EpochShuffleSampler):
            return {"resumable": False}
        epoch, start = self._pass
        # Every rank has consumed as many batches as the others: rank 0's state (the one Lightning saves)
        # is every rank's. Positions count within a rank's share.
        state = {
            "resumable": True,
            "epoch": epoch,
            "samples_consumed": start + self._batches_yielded * int(self.batch_size or 1),
            "num_samples": self.sampler.num_samples_total,
            "num_replicas": self.sampler.num_replicas,
        }
        if self._generator_state is not None:
            state["generator_state"] = self._generator_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("resumable") or not isinstance(self.sampler, EpochShuffleSampler):
            warnings.warn(
                "the checkpoint holds no data position for this loader: its epoch restarts from the first batch",
                stacklevel=2,
            )
            return
        if int(state["num_samples"]) != self.sampler.num_samples_total:
            raise ValueError(
                f"the checkpoint was written with {state['num_samples']} training samples, this run has "
                f"{self.sampler.num_samples_total}: the data changed, so its order cannot be continued; resume "
                "with the same data, or start a new run from the exported weights"
            )
        epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        saved_replicas = int(state.get("num_replicas", 1))
        if saved_replicas != self.sampler.num_replicas:
            # The first consumed x saved_replicas samples of the global order were seen; continue after them.
            # Exact only when that count divides by the new world size (else a few samples repeat).
            consumed = consumed * saved_replicas // self.sampler.num_replicas
            warnings.warn(
                f"resuming a run of {saved_replicas} data-parallel ranks on {self.sampler.num_replicas}: the epoch "
                "continues at the same point of its order, but the noise of each rank differs from the straight run",
                stacklevel=2,
            )
        remaining = len(self.sampler) - consumed
        if remaining <= 0 or (self.drop_last and remaining < int(self.batch_size or 1)):
            epoch, consumed = epoch + 1, 0  # that epoch had no batch left
        self.sampler.resume_at(epoch, consumed)
        if "generator_state" in state and self.generator is not None:
            self.generator.set_state(state["generator_state"])


def seeded_captions(caption_of: Callable[[int], str], size: int, count: int, seed: int) -> list[str]:
    """Up to ``count`` distinct non-empty captions ``caption_of(i)`` of a seeded random order of ``0..size-1``, reading
    at most ``8 x count`` items (a set with few distinct captions, e.g. one instance prompt, is not read whole)."""
    captions: list[str] = []
    for index in np.random.default_rng(seed).permutation(size)[: 8 * count]:
        caption = str(caption_of(int(index)))
        if caption and caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                break
    return captions


def stratified_split(
    labels: np.ndarray | Sequence[int], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share equal in train and validation.

    Each class contributes ``round(n_class * val_fraction)`` samples to validation (at least one when
    ``val_fraction > 0`` and the class has two or more samples). Returns sorted int64 index arrays.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = int(round(len(members) * val_fraction))
        if val_fraction > 0 and count == 0 and len(members) >= 2:
            count = 1
        val_parts.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), val_idx.astype(np.int64)


class ImageDataModule(LightningDataModule):
    """Base DataModule: subclasses fill ``train_dataset``/``val_dataset`` and the metadata in ``setup``.

    Metadata every model may read: ``channels``, ``image_size``, ``num_classes`` (``None`` when
    unlabelled), ``class_names`` and ``has_captions``; and ``judge``, the classifier that can judge
    class-conditional samples of this data (``mnist5k``: the digit judge), or None: stage 2's final
    samples default to it (``stage.final_samples.judge: ${data.judge}``).
    """

    def __init__(self, batch_size: int, num_workers: int, seed: int, judge: str | None = None) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.judge = judge
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self.has_captions = False
        # The batch keys the model's conditioning reads (set by ldm-train from `conditioner.batch_keys`);
        # None carries every key the data has.
        self.condition_keys: tuple[str, ...] | None = None

    @property
    def metrics_reference(self) -> str | None:
        """The real images sample metrics compare with (``ldm-evaluate``'s ``reference``): ``mnist5k`` for the data
        the digit judge knows, else None (a subclass that has them on disk names its folder)."""
        return "mnist5k" if self.judge == "mnist5k" else None

    def example_captions(self, count: int, seed: int) -> list[str]:
        """Up to ``count`` distinct captions of the validation data (of the training data without one), chosen by
        ``seed``: the prompts a text model's previews show when none are configured. Empty without captions."""
        dataset = self.val_dataset if self.val_dataset is not None and len(self.val_dataset) else self.train_dataset
        if not self.has_captions or dataset is None:
            return []
        return seeded_captions(lambda i: dataset[i]["caption"], len(dataset), count, seed)

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "train")
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} samples, fewer than batch_size={self.batch_size}, "
                "so drop_last would leave no batches; lower data.batch_size or add data"
            )
        sampler = EpochShuffleSampler(len(dataset), self.seed, **data_parallel_share(self))
        return self._make_loader(dataset, sampler=sampler, drop_last=True, resumable=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_dataset is not None and (self.val_dataset is None or len(self.val_dataset) == 0):
            return []  # val_fraction=0: Lightning skips validation when given an empty iterable
        dataset = self._require(self.val_dataset, "validation")
        return self._make_loader(dataset, sampler=None, drop_last=False)

    def _require(self, dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"the {split} dataset is not built yet; call setup('fit') first")
        return dataset

    def _make_loader(
        self, dataset: Dataset, sampler: Sampler | None, drop_last: bool, resumable: bool = False
    ) -> DataLoader:
        persistent = self.num_workers > 0
        return (ResumableDataLoader if resumable else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,  # the sampler (train) or natural order (validation) fixes the order
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_examples, keys=self.condition_keys),
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=persistent,
            # Only seeds worker processes' base seed; sample randomness comes from (seed, epoch, index).
            generator=torch.Generator().manual_seed(self.seed),
        )

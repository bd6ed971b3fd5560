"""Latent cache: encode the dataset once with the frozen first stage and train stage 2 from the cache.

The frozen encoder gives the same posterior for an image every epoch, so encoding it again is wasted
work. The cache stores the posterior mean and std (both flips when the data flips), so training still
samples a fresh z each step. It is keyed by a hash of the autoencoder's weights and of the data, and
rebuilt automatically when either changes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ldm import distributed
from ldm.data.base import (
    EpochShuffleSampler,
    ResumableDataLoader,
    collate_values,
    data_parallel_share,
    sample_rng,
)
from ldm.data.mapped_tensors import MappedTensors, read_header
from ldm.io.export import atomic_path, save_tensors_atomic, write_text_atomic

# 2: condition keys are the model's (conditioner.batch_keys): numeric ones as "cond.<key>" tensors.
CACHE_VERSION = 2
COND_PREFIX = "cond."
METADATA = ("image_size", "channels", "num_classes", "class_names", "has_captions", "batch_size", "seed",
            "metrics_reference")


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset, description: dict[str, Any]) -> str:
    """What the data is: its config, its size, and the content of a few of its items."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    n = len(dataset)
    digest.update(str(n).encode())
    for index in sorted({0, n // 2, n - 1}):
        item = dataset[index]
        digest.update(item["image"].numpy().tobytes())
        digest.update(str(item.get("label")).encode())
    return digest.hexdigest()[:16]


class CachedLatentDataset(Dataset):
    """Items ``{latent_mean, latent_std, <condition keys>}``; a flip is picked per (seed, epoch, index).

    The moments stay in the memory-mapped cache file: only the rows a batch uses are read. Numeric conditions
    (labels) are tensors ``cond.<key>`` of that file; the others (captions) come from a JSON file beside it."""

    def __init__(self, tensors: MappedTensors, texts: dict[str, list[Any]], seed: int) -> None:
        self.tensors = tensors  # mean/std: (N, F, C, h, w); F = 2 when flips were encoded
        self.num_flips = tensors.shape("mean")[1]
        self.numeric = {name[len(COND_PREFIX):]: tensors.rows(name, slice(None))
                        for name in tensors.names() if name.startswith(COND_PREFIX)}
        self.texts = texts
        self.seed = seed

    def __len__(self) -> int:
        return self.tensors.shape("mean")[0]

    def __getitem__(self, key) -> dict[str, Any]:
        index, rng = sample_rng(self.seed, key)
        flip = int(rng.integers(self.num_flips)) if self.num_flips > 1 else 0
        item: dict[str, Any] = {"latent_mean": self.tensors.rows("mean", (index, flip)),
                                "latent_std": self.tensors.rows("std", (index, flip))}
        item.update({key: values[index] for key, values in self.numeric.items()})
        item.update({key: values[index] for key, values in self.texts.items()})
        return item


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: collate_values([it[key] for it in items]) for key in items[0]}


@torch.no_grad()
def encode_dataset(dataset: Dataset, first_stage: Any, with_flips: bool, batch_size: int = 256,
                   indices: range | None = None, keys: Sequence[str] | None = None):
    """Posterior moments of the items ``indices`` (all by default), in index order, and their condition ``keys``
    (numeric ones as tensors ``cond.<key>``, the rest as lists; None: every key the items have). Captions are
    those of epoch 0."""
    means, stds = [], []
    conditions: dict[str, list[Any]] = {}
    device = first_stage.scale_factor.device
    indices = range(len(dataset)) if indices is None else indices
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        images = torch.stack([it["image"] for it in items]).to(device)  # (B, C, H, W)
        variants = [images, images.flip(-1)] if with_flips else [images]
        moments = [first_stage.encode_moments(x) for x in variants]
        means.append(torch.stack([m for m, _ in moments], dim=1).cpu())  # (B, F, C, h, w)
        stds.append(torch.stack([s for _, s in moments], dim=1).cpu())
        for key in (sorted(set(items[0]) - {"image"}) if keys is None else keys):
            if key not in items[0]:
                raise ValueError(f"the model's conditioning reads batch key {key!r}, which this data lacks "
                                 f"(it has {sorted(items[0])})")
            conditions.setdefault(key, []).extend(it[key] for it in items)
    tensors = {"mean": torch.cat(means), "std": torch.cat(stds)}
    texts = {}
    for key, values in conditions.items():
        batched = collate_values(values)
        if torch.is_tensor(batched):
            tensors[COND_PREFIX + key] = batched
        else:
            texts[key] = batched
    return tensors, texts


def write_concatenated(path: Path, parts: list[Path]) -> None:
    """One safetensors file whose tensors are those of ``parts`` concatenated along dim 0, streamed part by
    part: the merging process never holds more than one part's tensor in memory."""
    maps = [MappedTensors(p) for p in parts]
    _, header = read_header(parts[0])
    layout, offset = {}, 0
    for name in sorted(header):
        shape = [sum(m.shape(name)[0] for m in maps), *header[name]["shape"][1:]]
        size = sum(m[name].nbytes for m in maps)
        layout[name] = {"dtype": header[name]["dtype"], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(layout, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in sorted(layout):
            for m in maps:
                f.write(np.ascontiguousarray(m[name]).tobytes())


def refuse_uncacheable(datamodule: LightningDataModule) -> None:
    """Data options the cache cannot honour, refused before anything is encoded."""
    if getattr(datamodule, "buckets", None) is not None:
        # The cache holds one square latent size per split, and its loader batches without buckets.
        raise ValueError("stage.latent_cache=true cannot cache data.buckets (its latents are of one square size and "
                         "its batches ignore buckets): set stage.latent_cache=false, or data.buckets=null")
    if dict(getattr(datamodule, "hparams", {})).get("random_crop"):
        raise ValueError("stage.latent_cache=true encodes each image once, so with data.random_crop=true every epoch "
                         "would train on epoch 0's crop: set data.random_crop=false (flips are cached), or "
                         "stage.latent_cache=false")


class LatentCacheDataModule(LightningDataModule):
    """Wraps an image DataModule; serves cached posterior moments instead of images."""

    def __init__(self, datamodule: LightningDataModule, first_stage: Any, cache_dir: str | Path,
                 keys: Sequence[str] | None = None) -> None:
        super().__init__()
        refuse_uncacheable(datamodule)
        # the condition keys the model reads (conditioner.batch_keys); None: every key the data has
        self.keys = None if keys is None else tuple(keys)
        self.datamodule = datamodule
        self.first_stage = first_stage
        self.cache_dir = Path(cache_dir)
        self.train_dataset: CachedLatentDataset | None = None
        self.val_dataset: CachedLatentDataset | None = None
        self.hits = self.misses = 0
        # What models read of their data (image_size, num_classes, ...) is the wrapped DataModule's.
        for name in METADATA:
            setattr(self, name, getattr(datamodule, name, None))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.datamodule.setup(stage)
        seed = int(self.seed or 0)
        flips = bool(getattr(self.datamodule, "random_flip", False))
        ae_hash = weights_hash(self.first_stage.autoencoder)
        description = {
            "datamodule": type(self.datamodule).__name__,
            "hparams": dict(getattr(self.datamodule, "hparams", {})),
            "flips": flips,
            "keys": None if self.keys is None else list(self.keys),
            "version": CACHE_VERSION,
        }
        self.train_dataset = self._load_or_build("train", self.datamodule.train_dataset, ae_hash, description, flips, seed)
        self.val_dataset = self._load_or_build("val", self.datamodule.val_dataset, ae_hash, description, False, seed)

    def example_captions(self, count: int, seed: int) -> list[str]:
        return self.datamodule.example_captions(count, seed)

    def cache_path(self, split: str, dataset: Dataset, ae_hash: str, description: dict[str, Any]) -> Path:
        key = f"{split}-{dataset_fingerprint(dataset, {**description, 'split': split})}-{ae_hash}"
        return self.cache_dir / f"latents-{key}.safetensors"

    def _load_or_build(self, split, dataset, ae_hash, description, flips, seed) -> CachedLatentDataset:
        path = self.cache_path(split, dataset, ae_hash, description)
        texts_path = path.with_suffix(".conditions.json")
        # Rank 0 decides for all: a rank that looked later could find the file the others are writing.
        if distributed.broadcast_object(path.is_file()):
            self.hits += 1
        else:
            self.misses += 1
            self._build(path, texts_path, dataset, flips)
        texts = json.loads(texts_path.read_text()) if texts_path.is_file() else {}
        return CachedLatentDataset(MappedTensors(path), texts, seed)

    def _build(self, path: Path, texts_path: Path, dataset: Dataset, flips: bool) -> None:
        """Every rank encodes its contiguous share of the items on its own device into a part file; rank 0
        joins the parts into the cache (the text conditions first, the cache file last, so its presence means a
        complete cache). Needs a folder every rank sees (a shared file system across nodes)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.first_stage.to(trainer.strategy.root_device)  # before Lightning moves it: encode on the GPU
        rank, world = distributed.rank(), distributed.world_size()
        share = distributed.shard(len(dataset))
        tensors, texts = encode_dataset(dataset, self.first_stage, with_flips=flips,
                                        indices=range(share.start, share.stop), keys=self.keys)
        part = path.with_name(f"{path.stem}.part{rank:05d}-of-{world:05d}.safetensors")
        save_tensors_atomic(part, tensors)
        all_texts = distributed.all_gather_objects(texts)  # in rank order, as the shares
        if rank == 0:
            if all_texts[0]:
                joined = {key: [v for part in all_texts for v in part[key]] for key in all_texts[0]}
                write_text_atomic(texts_path, json.dumps(joined))
            parts = [path.with_name(f"{path.stem}.part{r:05d}-of-{world:05d}.safetensors") for r in range(world)]
            write_concatenated(path, parts)
            for p in parts:
                p.unlink()
        distributed.barrier()

    def train_dataloader(self) -> DataLoader:
        batch_size = self.batch_size
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(self.train_dataset), int(self.seed or 0), **data_parallel_share(self)),
            collate_fn=collate_latents,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=collate_latents)

"""``ldm-prepare`` on many processes and GPUs: source slices split over torchrun ranks, images read and decoded
by a DataLoader, the frozen networks run once per rank.

Each rank takes every ``WORLD_SIZE``-th source slice and writes its shards itself; a slice is one shard whoever
writes it, its samples batched for encoding the same way (``encode_batch_size`` consecutive images of the slice),
so the shards are identical whatever the number of ranks, and an interrupted run is finished by any number.
torch.distributed (gloo: nothing but a barrier and one count cross ranks) only waits for every rank before rank 0
writes the index.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data import shards
from ldm.data.image_files import UnreadableImageWarning

log = logging.getLogger("ldm.prepare")
_FIRST_FEW = 5
# What a slice writer reads from the ldm-prepare config (resolved before it travels to worker processes).
WRITER_KEYS = ("source", "output", "chunk_bytes", "encode", "encode_batch_size", "encode_settings", "first_stage", "cond")


def original_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), after a full decode: a truncated or corrupt
    file fails here, at preparation, rather than in a training step."""
    with Image.open(io.BytesIO(data)) as handle:
        handle.load()
        return ImageOps.exif_transpose(handle).size


def check_sample(raw: dict[str, Any], shard: int, position: int, skipped: list[str]) -> dict[str, Any] | None:
    """The shard sample of one source record, or None (its key appended to ``skipped``) when unreadable."""
    data = raw.get("image")
    try:
        if not data:
            raise ValueError("no image member")
        width, height = original_size(data)
    except Exception as error:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...)
        skipped.append(raw["key"])
        if len(skipped) & (len(skipped) - 1) == 0:  # 1, 2, 4, ...: informative without flooding
            warnings.warn(f"skipped unreadable image {raw['key']} ({type(error).__name__}: {error}); "
                          f"{len(skipped)} in this shard so far", UnreadableImageWarning, stacklevel=2)
        return None
    width, height = int(raw.get("width") or width), int(raw.get("height") or height)
    label = raw.get("label")
    return {"id": shards.sample_id(shard, position), "key": str(raw["key"]), "image": bytes(data),
            "caption": raw.get("caption") or "", "label": -1 if label is None else int(label),
            "width": width, "height": height, "aspect": width / height}


def resolved_yaml(cfg: DictConfig) -> str:
    """What a slice writer reads, resolved here: the run folder's interpolations only resolve in this process."""
    return OmegaConf.to_yaml({k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                              for k in WRITER_KEYS if k in cfg})


# --- ranks --------------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size), with a gloo process group while there is more than one rank."""
    import torch.distributed as dist

    rank, world, _ = rank_and_world()
    if world == 1 or dist.is_initialized():
        yield rank, world
        return
    # A rank waits at the final barrier for the slowest rank's slices: hours on a large source, not gloo's 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(days=2))
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


def encode_device(setting: str) -> str:
    """``auto``/``cuda``: this rank's GPU (``cuda:<LOCAL_RANK>``) when there is one; else the CPU (``auto``)."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return f"cuda:{rank_and_world()[2]}"
    return setting


def sum_over_ranks(values: list[int]) -> list[int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.long)
    dist.all_reduce(total)
    return total.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# --- decoding in DataLoader workers, encoding here ------------------------------------------------------------
def _as_is(item: Any) -> Any:
    return item


class DecodedSlices(IterableDataset):
    """Reads, checks and decodes the images of some source slices, each worker whole slices of its own, and
    yields them in encoding batches: ``{"piece", "samples", "pixels" (B, C, S, S), "last", "skipped"}``; the
    ``last`` item of a slice (its batch possibly empty) closes its shard. No network is built here."""

    def __init__(self, cfg_yaml: str, pieces: list[int]) -> None:
        self.cfg_yaml = cfg_yaml
        self.pieces = pieces

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from hydra.utils import instantiate

        from ldm.data.image_files import ImageTransform
        from ldm.data.shard_encoding import encoding_pixels

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # resolved and checked by ldm-prepare already (resolved_yaml, SliceWriter)
        cfg = OmegaConf.create(self.cfg_yaml)
        source = instantiate(cfg.source)
        slices = source.slices()
        transform = ImageTransform(int(cfg.encode_settings.image_size), str(cfg.encode_settings.mode))
        size = int(cfg.encode_batch_size)
        for index in self.pieces[worker::workers]:
            piece, skipped, batch, position = slices[index], [], [], 0
            for raw in source.read(piece):
                sample = check_sample(raw, piece.index, position, skipped)
                if sample is None:
                    continue
                position += 1
                batch.append((sample, encoding_pixels(transform, transform.decode(io.BytesIO(sample["image"])))))
                if len(batch) == size:
                    yield _item(index, batch, False, skipped)
                    batch = []
            yield _item(index, batch, True, skipped)


def _item(index: int, batch: list, last: bool, skipped: list[str]) -> dict[str, Any]:
    return {"piece": index, "samples": [s for s, _ in batch], "last": last, "skipped": list(skipped),
            "pixels": torch.stack([p for _, p in batch]) if batch else None}


def encode_slices(writer: Any, indices: list[int], cfg: DictConfig, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
    """Write the shards of the slices ``indices`` with ``writer``'s encoder (this process's one copy),
    the images decoded by ``cfg.num_workers`` DataLoader workers; returns their manifests."""
    manifests, pending = [], []
    for index in indices:
        piece = writer.pieces[index]
        done = shards.finished_manifest(writer.out, piece.index, piece.key, writer.settings)
        if done is not None:
            manifests.append({**done, "skipped_existing": True})
        else:
            pending.append(index)
    workers = int(cfg.num_workers)
    loader = DataLoader(DecodedSlices(resolved_yaml(cfg), pending), batch_size=None, collate_fn=_as_is,
                        num_workers=workers, pin_memory=writer.encoder.device.type == "cuda",
                        # spawned, not forked: a fork inheriting torch's thread pools (or CUDA) can deadlock
                        multiprocessing_context="spawn" if workers > 0 else None)
    open_shards: dict[int, shards.ShardWriter] = {}
    for item in loader:
        index = item["piece"]
        piece = writer.pieces[index]
        if index not in open_shards:
            open_shards[index] = shards.ShardWriter(writer.out, piece.index, piece.key, writer.settings,
                                                    cfg.chunk_bytes)
        shard = open_shards[index]
        if item["samples"]:
            writer.encoder.encode(item["samples"], item["pixels"])
            for sample in item["samples"]:
                shard.add(sample)
        if item["last"]:
            skipped = item["skipped"]
            manifests.append(shard.finish({"num_skipped": len(skipped), "skipped": skipped[:_FIRST_FEW]}))
            del open_shards[index]
            log.info("shard %d: %d samples encoded on %s by rank %d of %d", piece.index, shard.count,
                     writer.encoder.device, rank, world)
    return manifests

"""Sampling sets of any size across the ranks of a run, in fixed batches that stream to disk.

A set of N images is cut into global batches of ``batch_size``; batch b draws its noise from a generator seeded
by (seed, b) alone, so a batch is the same images whichever rank draws it, and a run on W processes gives
exactly the images of a run on one. Rank r draws its contiguous share of the batches, turns each into uint8 on
its device and hands it on (to a part file, a feature extractor) before drawing the next: no rank ever holds
more than a batch of the set, and no collective ever carries a decoded image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm import distributed


def batch_size_of(conditions: dict[str, Any]) -> int:
    for value in conditions.values():
        if value is not None:
            return len(value)
    raise ValueError("conditions are empty: give labels, prompts or n")


def slice_conditions(conditions: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: (v[start:stop] if v is not None else None) for k, v in conditions.items()}


def uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C) on the images' own device, rounding as the ADM evaluator
    expects: on a GPU the copy to the host is then a quarter of the float32 one."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def batch_seed(seed: int, index: int) -> int:
    """The seed of global batch ``index`` of a set drawn with ``seed`` (hashed: seeds s and s + 1 share no batch)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class SampleBatch:
    start: int  # index of the batch's first image in the whole set
    images: np.ndarray  # (B, H, W, C) uint8, on the host
    conditions: dict[str, Any]  # the batch's slice of the set's conditions (labels, prompts, ...)


def rank_batches(n: int, batch_size: int, rank: int | None = None, world: int | None = None) -> tuple[range, int]:
    """(the global batches this rank draws, how many more the busiest rank draws): shares of whole batches,
    contiguous, so the ranks' rows joined in rank order are the set in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = -(-n // batch_size)
    mine = distributed.shard(count, rank, world)
    world = distributed.world_size() if world is None else world
    return range(mine.start, mine.stop), -(-count // world) - len(range(mine.start, mine.stop))


def _collective_forward(model: Any) -> bool:
    """Whether each forward of the backbone is a collective (FSDP2 shards its parameters as DTensors): every
    rank must then run the network as often as the others, even when it has no batch left to draw."""
    return any(type(p).__name__ == "DTensor" for p in model.backbone.parameters())


def _host_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """Where a batch lands on the host (one place, so a test can count the images alive at once)."""
    return np.empty(shape, dtype=np.uint8)


def sample_stream(model: Any, conditions: dict[str, Any], image_size: int, seed: int, batch_size: int = 256,
                  edit: Any = None, **sample_kwargs: Any) -> Iterator[SampleBatch]:
    """This rank's batches of the set ``conditions`` describes, as uint8 NHWC host arrays, one at a time.

    ``sample_kwargs`` go to ``model.sample`` (sampler, guidance_scale, guidance_rescale, autocast_dtype, ...);
    ``edit`` (a ``LatentEdit`` over the whole set) is sliced with the conditions. Every rank must exhaust it.
    """
    n = batch_size_of(conditions)
    mine, extra = rank_batches(n, batch_size)
    if not _collective_forward(model):
        extra = 0
    # A padding batch repeats the set's first: drawn only so that every rank runs the network equally often.
    for index, keep in [*((b, True) for b in mine), *((0, False) for _ in range(extra))]:
        start, stop = index * batch_size, min(n, (index + 1) * batch_size)
        chunk = slice_conditions(conditions, start, stop)
        generator = torch.Generator(device=model.device).manual_seed(batch_seed(seed, index))
        part = None if edit is None else edit.slice(start, stop, model.device)
        images = model.sample(chunk, image_size, generator=generator, batch_size=stop - start, edit=part,
                              uint8=True, **sample_kwargs)
        if not keep:
            continue
        host = _host_buffer(tuple(images.shape))
        torch.from_numpy(host).copy_(images)
        del images
        yield SampleBatch(start, host, chunk)


def capped_groups(count: int, limit: int, seed: int) -> list[int]:
    """At most ``limit`` of the groups (classes, prompts) ``range(count)``: all of them when they fit, else a
    subset drawn with ``seed`` alone, in order, so every call (every preview of a run) shows the same ones."""
    if limit < 1:
        raise ValueError(f"the cap must be >= 1, got {limit}")
    if count <= limit:
        return list(range(count))
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())

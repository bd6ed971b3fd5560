"""Condition sets: slicing them into batches, and sampling them in shares across the ranks of a run."""

from __future__ import annotations

from typing import Any

import torch

from ldm import distributed


def batch_size_of(conditions: dict[str, Any]) -> int:
    for value in conditions.values():
        if value is not None:
            return len(value)
    raise ValueError("conditions are empty: give labels, prompts or n")


def slice_conditions(conditions: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: (v[start:stop] if v is not None else None) for k, v in conditions.items()}


def sample_sharded(
    model: Any, conditions: dict[str, Any], image_size: int, seed: int, **kwargs: Any
) -> torch.Tensor:
    """``model.sample`` over all ``conditions``, split across the ranks of a distributed run.

    Each rank draws its contiguous share with the seed ``seed + rank`` and every rank gets the whole set
    back (N, C, H, W) in the order of ``conditions``; a single process draws everything with ``seed``,
    exactly as a plain ``sample`` call would. Every rank must call it (it all-gathers).
    """
    n, world = batch_size_of(conditions), distributed.world_size()
    # Equal shares, the last padded with repeats of the last condition: under FSDP every rank must run the
    # network as many times as the others (each forward gathers the shards collectively).
    share = -(-n // world)
    start = min(distributed.rank() * share, n - 1)
    mine = slice_conditions(conditions, start, start + share)
    pad = share - batch_size_of(mine)
    if pad:
        mine = {k: (v if v is None else _concat(v, v[-1:] * pad if isinstance(v, list) else v[-1:].repeat_interleave(pad, 0)))
                for k, v in mine.items()}
    generator = torch.Generator(device=model.device).manual_seed(int(seed) + distributed.rank())
    images = model.sample(mine, image_size, generator=generator, **kwargs)
    return torch.cat(distributed.all_gather_objects(images))[:n]


def _concat(a: Any, b: Any) -> Any:
    return a + b if isinstance(a, list) else torch.cat([a, b])

"""Aspect-ratio buckets (SDXL, Podell et al. 2023, sec. 2.3 and appendix): train on non-square images.

Images are grouped into resolution buckets of about equal pixel area (so every batch costs about the same);
each image goes to the bucket whose aspect ratio is closest to its own (by log-ratio, so 1:2 and 2:1 are
equally far from 1:1), is resized to cover the bucket and cropped to it. Every batch is drawn from one bucket.
What the crop did is recorded for SDXL's size/crop micro-conditioning (:mod:`ldm.nets.micro_conditioning`):

    "original_size" (h, w) of the image before resizing, "crop_coords" (top, left) of the crop in the
    resized image, "target_size" (h, w) of the bucket; each a long (B, 2) tensor in a batch.

Randomness follows :mod:`ldm.data.base`: the batch order is derived from ``(seed, epoch)``, crops and flips
from ``(seed, epoch, index)``, so batches are reproducible, resumable mid-epoch and split disjointly between
data-parallel ranks. The batch sampler yields whole batches of ``(index, epoch)`` keys; the loader runs with
``batch_size=None`` and :class:`BucketBatches` reads one batch per sampler item, so a worker builds a whole
batch, and Lightning keeps the sampler (a ``DistributedSampler``) and saves its position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ldm.data.base import EpochShuffleSampler, collate_examples, sample_seed
from ldm.data.image_files import FileImageDataset, decode_image
from ldm.data.tensor_images import uint8_to_signed_unit

SIZE_KEYS = ("original_size", "crop_coords", "target_size")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF rotations by 90 degrees swap height and width


@dataclass(frozen=True)
class BucketOptions:
    """Which buckets exist.

    Args:
        base_size: bucket areas are about ``base_size**2`` pixels (never more, so memory stays bounded).
        step: bucket sides are multiples of this; make it the first stage's downsample factor times the
            backbone's (8 x 8 = 64 for SD's kl-f8 and UNet), or the latents cannot be downsampled evenly.
        max_aspect: the longest side is at most this many times the shortest.
    """

    base_size: int = 256
    step: int = 64
    max_aspect: float = 2.0

    def __post_init__(self) -> None:
        if self.step < 1 or self.base_size < self.step:
            raise ValueError(f"buckets need 1 <= step <= base_size, got step={self.step}, base_size={self.base_size}")
        if self.base_size % self.step:
            raise ValueError(f"buckets.base_size={self.base_size} must be a multiple of buckets.step={self.step} "
                             "so that the square bucket exists")
        if self.max_aspect < 1.0:
            raise ValueError(f"buckets.max_aspect is long side / short side, so >= 1; got {self.max_aspect}")


def bucket_resolutions(options: BucketOptions) -> list[tuple[int, int]]:
    """(height, width) of every bucket, sorted from tallest to widest.

    As SDXL's table: for each width a multiple of ``step``, the largest height (also a multiple) whose area
    stays <= base_size**2, and the transposes; so every area lies in (base**2 - step * long side, base**2].
    """
    area = options.base_size**2
    found = set()
    for width in range(options.step, area // options.step + 1, options.step):
        height = area // width // options.step * options.step
        if height < options.step:
            break
        if max(height, width) <= options.max_aspect * min(height, width):
            found.update({(height, width), (width, height)})
    return sorted(found, key=lambda hw: (hw[1] / hw[0], -hw[0] * hw[1]))


def assign_buckets(sizes: Sequence[tuple[int, int]], resolutions: Sequence[tuple[int, int]]) -> np.ndarray:
    """Index into ``resolutions`` of the bucket whose aspect ratio is closest (in log-ratio) to each (h, w)."""
    if not resolutions:
        raise ValueError("no buckets to assign images to; raise buckets.max_aspect or lower buckets.step")
    sizes_arr = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if (sizes_arr <= 0).any():
        raise ValueError("image sizes must be positive (height, width) pairs")
    buckets = np.asarray(resolutions, dtype=np.float64)
    log_ratio = np.log(sizes_arr[:, 1] / sizes_arr[:, 0])[:, None]  # (N, 1)
    distance = np.abs(log_ratio - np.log(buckets[:, 1] / buckets[:, 0])[None])  # (N, K)
    return distance.argmin(axis=1)  # first of equally close buckets: resolutions are sorted, so deterministic


def stored_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as decoded (EXIF rotation applied), from its header only."""
    with Image.open(path) as handle:
        width, height = handle.size
        orientation = handle.getexif().get(_EXIF_ORIENTATION, 1)
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


@dataclass(frozen=True)
class BucketTransform:
    """PIL image -> float (C, h, w) in [-1, 1] for a bucket (h, w), plus what SDXL conditions on.

    The image is resized (antialiased) so it covers the bucket, then centre- or randomly cropped to it and
    optionally flipped. A flip mirrors the crop too: crop_left is then measured from the flipped image's left
    edge, so the recorded coordinates describe the pixels the model actually sees.
    """

    mode: str = "RGB"
    random_crop: bool = False
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {self.mode!r}")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    def decode(self, path: str | Path) -> Image.Image:
        # Full size: the original size is part of the conditioning, and a JPEG draft would change it.
        return decode_image(path, self.mode)

    def __call__(self, image: Image.Image, bucket: tuple[int, int], rng: np.random.Generator
                 ) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
        height, width = image.height, image.width
        target_h, target_w = bucket
        scale = max(target_h / height, target_w / width)
        # ceil, so rounding never leaves the resized image a pixel short of the bucket
        resized_h = max(target_h, math.ceil(height * scale - 1e-6))
        resized_w = max(target_w, math.ceil(width * scale - 1e-6))
        tensor = TF.to_image(image)  # uint8 (C, H, W)
        if (resized_h, resized_w) != (height, width):
            tensor = TF.resize(tensor, [resized_h, resized_w], interpolation=v2.InterpolationMode.BILINEAR,
                               antialias=True)
        if self.random_crop:
            top = int(rng.integers(resized_h - target_h + 1))
            left = int(rng.integers(resized_w - target_w + 1))
        else:
            top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
        tensor = TF.crop(tensor, top, left, target_h, target_w)
        if self.random_flip and rng.random() < 0.5:
            tensor = TF.horizontal_flip(tensor)
            left = resized_w - target_w - left
        sizes = {"original_size": (height, width), "crop_coords": (top, left), "target_size": (target_h, target_w)}
        return uint8_to_signed_unit(tensor.as_subclass(torch.Tensor)), sizes


class BucketImageDataset(FileImageDataset):
    """Image files, each shaped to its bucket, with the size keys of the module docstring.

    A replacement for an unreadable file (see :mod:`ldm.data.image_files`) takes the requested index's bucket,
    so a batch stays one resolution whichever file fills a slot.
    """

    def __init__(self, paths: Sequence[str | Path], transform: BucketTransform, resolutions: Sequence[tuple[int, int]],
                 bucket_ids: Sequence[int], **kwargs: Any) -> None:
        super().__init__(paths, transform, **kwargs)  # type: ignore[arg-type]
        if len(bucket_ids) != len(self.paths):
            raise ValueError(f"{len(bucket_ids)} bucket ids for {len(self.paths)} files")
        self.resolutions = [tuple(int(v) for v in hw) for hw in resolutions]
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)

    def _make_example(self, index: int, candidate: int, image: Image.Image, rng: np.random.Generator) -> dict[str, Any]:
        tensor, sizes = self.transform(image, self.resolutions[self.bucket_ids[index]], rng)
        return {**self._example(candidate, tensor), **sizes}


class BucketBatches(Dataset):
    """One item per batch: the examples of a list of keys (what :class:`BucketBatchSampler` yields)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, keys: Sequence[Any]) -> list[dict[str, Any]]:
        return [self.dataset[key] for key in keys]


def collate_bucket_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shared batch dict (:func:`ldm.data.base.collate_examples`) plus the size keys as long (B, 2)."""
    shapes = {tuple(example["image"].shape) for example in examples}
    if len(shapes) > 1:
        raise ValueError(f"a bucket batch mixes image shapes {sorted(shapes)}; batches must come from one bucket")
    batch = collate_examples([{k: v for k, v in ex.items() if k not in SIZE_KEYS} for ex in examples])
    for key in SIZE_KEYS:
        batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.long)  # (B, 2)
    return batch


class BucketBatchSampler(EpochShuffleSampler):
    """Yields batches (lists of ``(index, epoch)`` keys), each from one bucket, in an order derived from
    ``(seed, epoch)``.

    Each epoch every bucket's members are permuted and cut into batches (``drop_last``: a bucket's last partial
    batch is left out that epoch, a different remainder each epoch); the batches of all buckets are then
    shuffled into one global order, of which rank r of W takes positions r, r + W, ... (a last partial round
    is dropped), so ranks get disjoint batches. Positions (``len``, :meth:`resume_at`, the loader's state) count
    batches, which is what :class:`~ldm.data.base.ResumableDataLoader` saves when its ``batch_size`` is None.
    Without ``drop_last`` (validation) partial batches are kept and the order is padded by repeating its first
    batches until every rank has as many, so no rank waits on another.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(len(bucket_ids), seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.members = [np.flatnonzero(ids == bucket) for bucket in np.unique(ids)]
        per_bucket = [len(m) // batch_size if drop_last else -(-len(m) // batch_size) for m in self.members]
        self.num_batches_total = sum(per_bucket)
        if self.num_batches_total < num_replicas:
            sizes = sorted((len(m) for m in self.members), reverse=True)
            raise ValueError(
                f"{len(ids)} images in {len(self.members)} buckets (largest: {sizes[:5]}) make "
                f"{self.num_batches_total} full batches of {batch_size}, fewer than the {num_replicas} rank(s); "
                "lower data.batch_size, add images, or use fewer buckets (a lower buckets.max_aspect)"
            )

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_batches_total // self.num_replicas
        return -(-self.num_batches_total // self.num_replicas)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batch order (before the split between ranks)."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, -1))
        batches = []
        for members in self.members:
            order = rng.permutation(members) if self.shuffle else members
            stop = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
            batches += [order[i : i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        epoch = self.epoch
        self.epoch += 1
        start = 0
        if self._resume is not None:  # as EpochShuffleSampler: only the resumed epoch's pass is shortened
            start = self._resume[1] if self._resume[0] == epoch else 0
            self._resume = None
        self.last_pass = (epoch, start)
        batches = self.epoch_batches(epoch)
        rounds = len(self) * self.num_replicas
        batches = (batches * (-(-rounds // len(batches))))[:rounds]  # padding (validation) or the partial round
        for batch in batches[self.rank :: self.num_replicas][start:]:
            yield [(index, epoch) for index in batch]

"""Decoding image files into model-ready tensors, tolerating corrupt files.

Used by :mod:`ldm.data.folder` (users' own images) and by CelebA in :mod:`ldm.data.torchvision_data`.
Files are decoded lazily in ``__getitem__``; decoding everything at scan time would take hours on large
datasets. A file that fails to decode is skipped: the sample is replaced by the next readable file in
cyclic order (deterministic, whichever worker hits it), counted, and reported with an
:class:`UnreadableImageWarning`. When more than ``max_corrupt_fraction`` of the files turn out to be
unreadable the dataset raises instead, because that points at a wrong path or format rather than a few
bad files.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ldm.data.base import SampleKey, sample_seed, split_key
from ldm.data.tensor_images import uint8_to_signed_unit

_FIRST_FEW = 5


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float (C, image_size, image_size) in [-1, 1].

    Order: optional centre pre-crop to ``precrop`` pixels (CelebA's face crop), resize so the *shorter*
    side equals ``image_size`` (smaller images are upscaled, larger ones downscaled, antialiased),
    then a centre or random square crop and an optional horizontal flip. Random choices come from the
    caller's per-sample generator, never from the global RNG.
    """

    image_size: int
    mode: str = "RGB"
    random_crop: bool = False
    random_flip: bool = False
    precrop: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {self.mode!r}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    def decode(self, path: str | Path) -> Image.Image:
        """Open and fully decode ``path`` in ``mode``; raises on unreadable data."""
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft keeps both sides >= the request.
        return decode_image(path, self.mode, None if self.precrop is not None else self.image_size)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        tensor = TF.to_image(image)  # uint8 (C, H, W)
        if self.precrop is not None:
            tensor = TF.center_crop(tensor, [self.precrop, self.precrop])
        if min(tensor.shape[-2:]) != self.image_size:
            tensor = TF.resize(
                tensor, [self.image_size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
            )
        height, width = tensor.shape[-2:]
        size = self.image_size
        if self.random_crop:
            top = int(rng.integers(height - size + 1))
            left = int(rng.integers(width - size + 1))
            tensor = TF.crop(tensor, top, left, size, size)
        else:
            tensor = TF.center_crop(tensor, [size, size])
        if self.random_flip and rng.random() < 0.5:
            tensor = TF.horizontal_flip(tensor)
        return uint8_to_signed_unit(tensor.as_subclass(torch.Tensor))


def decode_image(path: str | Path, mode: str, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode ``path`` (EXIF orientation applied) in ``mode``; raises on unreadable data.

    draft_size: let JPEG decode at a reduced scale that keeps both sides >= this (None: full size)."""
    with Image.open(path) as handle:
        if draft_size is not None:
            handle.draft(None, (draft_size, draft_size))
        handle.load()  # forces the full decode so truncated files fail here, not later
        image = ImageOps.exif_transpose(handle)
        return _to_mode(image, mode)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to RGB/L, compositing transparency onto white (dropping alpha leaves black fringes)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode) if image.mode != mode else image


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit L, rescaled rather than clipped.

    PIL's own conversion clips at 255, which turns a 16-bit scan almost entirely white. Integer images
    with values above 255 are taken as 16-bit (divided by 257, so 65535 -> 255); float images within
    [0, 1] are scaled by 255, other float ranges are clipped.
    """
    values = np.asarray(image, dtype=np.float64)
    peak = values.max(initial=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        values = values / 257.0
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def is_readable(path: str | Path, transform: ImageTransform) -> bool:
    try:
        transform.decode(path)
    except Exception:  # noqa: BLE001 - image plugins raise many types (OSError, SyntaxError, struct.error...)
        return False
    return True


def check_corrupt_fraction(
    num_bad: int, num_checked: int, max_corrupt_fraction: float, where: str, examples: Sequence[str]
) -> None:
    """Raise when the unreadable share exceeds the tolerated fraction."""
    if num_checked and num_bad / num_checked > max_corrupt_fraction:
        raise ValueError(
            f"{num_bad} of {num_checked} image files checked under {where} are unreadable, more than "
            f"max_corrupt_fraction={max_corrupt_fraction}; check the path and file formats "
            f"(first few: {list(examples)[:_FIRST_FEW]})"
        )


class FileImageDataset(Dataset):
    """Image files with optional per-file labels and captions, decoded lazily.

    Args:
        paths: image files.
        transform: decoding and augmentation.
        labels: one class index per file, or ``None``.
        captions: one caption per file, or ``None``.
        seed: base of the per-sample ``(seed, epoch, index)`` randomness.
        max_corrupt_fraction: tolerated share of unreadable files before raising.
        where: how to name the dataset in messages (e.g. its root directory).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: ImageTransform,
        labels: Sequence[int] | None = None,
        captions: Sequence[str] | None = None,
        seed: int = 0,
        max_corrupt_fraction: float = 0.5,
        where: str = "",
    ) -> None:
        if not paths:
            raise ValueError(f"no image files to load{f' under {where}' if where else ''}")
        for name, values in (("labels", labels), ("captions", captions)):
            if values is not None and len(values) != len(paths):
                raise ValueError(f"{len(values)} {name} for {len(paths)} files")
        self.paths = [str(path) for path in paths]
        self.transform = transform
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.captions = None if captions is None else [str(caption) for caption in captions]
        self.seed = seed
        self.max_corrupt_fraction = max_corrupt_fraction
        self.where = where or "the dataset"
        # Per process: each DataLoader worker keeps its own tally.
        self.unreadable: dict[int, str] = {}

    @property
    def num_skipped(self) -> int:
        return len(self.unreadable)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, epoch = split_key(key)
        count = len(self.paths)
        for offset in range(count):
            candidate = (index + offset) % count
            if candidate in self.unreadable:
                continue
            try:
                image = self.transform.decode(self.paths[candidate])
            except Exception as error:  # noqa: BLE001 - see is_readable
                self._record_unreadable(candidate, error)
                continue
            # Seeded by the requested index, so a replacement sample is as reproducible as any other.
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
            return self._make_example(index, candidate, image, rng)
        raise ValueError(f"none of the {count} image files under {self.where} can be decoded")

    def _make_example(self, index: int, candidate: int, image: Image.Image, rng: np.random.Generator) -> dict[str, Any]:
        """The example for requested ``index`` from the decoded file ``candidate`` (``index`` itself unless
        that file was unreadable). A hook: aspect-ratio buckets shape it by the requested index's bucket."""
        return self._example(candidate, self.transform(image, rng))

    def _example(self, index: int, image: torch.Tensor) -> dict[str, Any]:
        example: dict[str, Any] = {"image": image}
        if self.labels is not None:
            example["label"] = int(self.labels[index])
        if self.captions is not None:
            example["caption"] = self.captions[index]
        return example

    def _record_unreadable(self, index: int, error: Exception) -> None:
        self.unreadable[index] = self.paths[index]
        skipped = len(self.unreadable)
        first_few = list(self.unreadable.values())[:_FIRST_FEW]
        # Whole-dataset denominator: only a share that is already certain may abort training.
        check_corrupt_fraction(skipped, len(self.paths), self.max_corrupt_fraction, self.where, first_few)
        if skipped & (skipped - 1) == 0:  # warn at 1, 2, 4, 8, ... to stay informative without flooding
            warnings.warn(
                f"skipped {skipped} unreadable image file{'s' if skipped != 1 else ''} under {self.where} "
                f"so far (first few: {first_few}); latest error: {type(error).__name__}: {error}",
                UnreadableImageWarning,
                stacklevel=2,
            )

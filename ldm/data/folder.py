"""Users' own images: a recursively scanned folder with optional labels and captions.

Layout conventions:

* Images: every file under ``root`` (recursively, following symlinks, skipping hidden ``.names``)
  whose extension is in ``FolderScanOptions.extensions``, case-insensitive. Animated GIFs use frame 0.
* Labels (``labels_from_subfolders=True``): the first-level subfolder name is the class,
  ``root/cat/x.jpg`` -> ``cat``; class indices follow sorted folder names.
* Captions (``captions=True``): ``root/captions.jsonl`` lines ``{"file": "<path relative to root>",
  "caption": "..."}`` take precedence over a sidecar ``<image stem>.txt`` beside the image. Images
  without any caption get ``""`` (the unconditional prompt for classifier-free guidance), with a warning.
* Geometry: shorter side resized to ``image_size`` (images smaller than that are *upscaled*), then a
  centre crop (or a random crop with ``random_crop``) and optionally a random horizontal flip.
  Validation never crops randomly or flips.
* Aspect-ratio buckets (``buckets``, see :mod:`ldm.data.buckets`): instead of the square crop, each image is
  resized and cropped to the equal-area bucket closest to its aspect ratio, every batch comes from one bucket,
  and batches carry ``original_size``, ``crop_coords`` and ``target_size`` for size micro-conditioning. Setup
  then reads every file's header once for its size.
* Corrupt files: see :mod:`ldm.data.image_files`. At setup a seeded sample of ``probe_size`` files is
  decoded to fail fast on a mostly-corrupt folder; ``verify=True`` decodes every file up front and drops
  the unreadable ones (exact, but slow on big folders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ldm.data.base import ImageDataModule, ResumableDataLoader, data_parallel_share, stratified_split
from ldm.data.buckets import (
    BucketBatches,
    BucketBatchSampler,
    BucketImageDataset,
    BucketOptions,
    BucketTransform,
    assign_buckets,
    bucket_resolutions,
    collate_bucket_examples,
    stored_size,
)
from ldm.data.image_files import (
    FileImageDataset,
    ImageTransform,
    UnreadableImageWarning,
    check_corrupt_fraction,
    is_readable,
)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
CAPTIONS_FILE = "captions.jsonl"


class MissingCaptionWarning(UserWarning):
    """Some images have no caption and fall back to the empty prompt."""


@dataclass(frozen=True)
class FolderScanOptions:
    """How the folder is scanned and checked.

    Args:
        extensions: file suffixes counted as images (case-insensitive, with the dot).
        verify: decode every file during setup and drop unreadable ones.
        max_corrupt_fraction: tolerated share of unreadable files before a ValueError.
        probe_size: files decoded at setup (seeded sample) to catch a mostly-corrupt folder early.
    """

    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    verify: bool = False
    max_corrupt_fraction: float = 0.5
    probe_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "extensions",
            tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in self.extensions),
        )
        if not self.extensions:
            raise ValueError("scan.extensions must name at least one image suffix, e.g. ['.png', '.jpg']")
        if not 0.0 <= self.max_corrupt_fraction < 1.0:
            raise ValueError(f"scan.max_corrupt_fraction must lie in [0, 1), got {self.max_corrupt_fraction}")
        if self.probe_size < 0:
            raise ValueError(f"scan.probe_size must be >= 0, got {self.probe_size}")


def scan_image_files(
    root: str | Path, extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> tuple[list[Path], dict[Path, str]]:
    """Image files under ``root`` sorted by relative path, plus sidecar captions found beside them."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"image folder {root} does not exist; set data.root to a directory of images")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is not a directory; set data.root to a directory of images")
    suffixes = {ext.lower() for ext in extensions}
    files: list[Path] = []
    sidecars: dict[Path, str] = {}
    visited: set[str] = set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:  # symlink cycle
            subdirs.clear()
            continue
        visited.add(real)
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        texts = {name for name in names if name.lower().endswith(".txt")}
        for name in names:
            stem, suffix = os.path.splitext(name)
            # Hidden files include macOS "._x.jpg" resource forks, which look like images but are not.
            if name.startswith(".") or suffix.lower() not in suffixes:
                continue
            path = Path(directory, name)
            files.append(path)
            if f"{stem}.txt" in texts:
                sidecars[path] = Path(directory, f"{stem}.txt").read_text(encoding="utf-8").strip()
    files.sort(key=lambda path: path.relative_to(root).as_posix())
    return files, sidecars


def read_captions_jsonl(path: Path) -> dict[str, str]:
    """``{relative posix path: caption}`` from a captions.jsonl file."""
    captions: dict[str, str] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("file"), str)
            or not isinstance(record.get("caption"), str)
        ):
            raise ValueError(f'{path}:{line_number} must look like {{"file": "a/b.jpg", "caption": "..."}}')
        captions[Path(record["file"]).as_posix()] = record["caption"].strip()
    return captions


def collect_captions(root: Path, files: Sequence[Path], sidecars: Mapping[Path, str]) -> list[str] | None:
    """One caption per file (jsonl over sidecar, else ""), or ``None`` when the folder has none at all."""
    jsonl_path = root / CAPTIONS_FILE
    from_jsonl = read_captions_jsonl(jsonl_path) if jsonl_path.is_file() else {}
    if not from_jsonl and not sidecars:
        return None
    relative = [path.relative_to(root).as_posix() for path in files]
    unknown = sorted(set(from_jsonl) - set(relative))
    if unknown:
        warnings.warn(
            f"{jsonl_path} names {len(unknown)} files that are not scanned images (first few: {unknown[:5]})",
            MissingCaptionWarning,
            stacklevel=2,
        )
    captions = [from_jsonl.get(rel, sidecars.get(path, "")) for rel, path in zip(relative, files)]
    missing = [rel for rel, caption in zip(relative, captions) if not caption]
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(files)} images under {root} have no caption and use the empty "
            f"prompt (first few: {missing[:5]})",
            MissingCaptionWarning,
            stacklevel=2,
        )
    return captions


def labels_from_first_level(root: Path, files: Sequence[Path]) -> tuple[list[int], list[str]]:
    """Class index per file from its first-level subfolder, and the sorted class names."""
    folders = []
    for path in files:
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            raise ValueError(
                f"labels_from_subfolders=true needs every image inside a class subfolder of {root}, "
                f"but {path} sits directly in it; move it or set labels_from_subfolders=false"
            )
        folders.append(parts[0])
    class_names = sorted(set(folders))
    index = {name: position for position, name in enumerate(class_names)}
    return [index[name] for name in folders], class_names


def drop_unreadable(
    files: list[Path], transform: ImageTransform, options: FolderScanOptions, seed: int, where: str
) -> list[Path]:
    """Decode all files (``verify``) or a seeded sample (``probe_size``); drop the ones that fail."""
    if options.verify:
        checked = list(range(len(files)))
    else:
        count = min(options.probe_size, len(files))
        checked = sorted(np.random.default_rng(seed).choice(len(files), size=count, replace=False).tolist())
    bad = {position for position in checked if not is_readable(files[position], transform)}
    if not bad:
        return files
    bad_paths = [str(files[position]) for position in sorted(bad)]
    check_corrupt_fraction(len(bad), len(checked), options.max_corrupt_fraction, where, bad_paths)
    warnings.warn(
        f"skipped {len(bad)} unreadable image file{'s' if len(bad) != 1 else ''} under {where} "
        f"(first few: {bad_paths[:5]})",
        UnreadableImageWarning,
        stacklevel=2,
    )
    return [path for position, path in enumerate(files) if position not in bad]


class ImageFolderDataModule(ImageDataModule):
    """A folder of images (see the module docstring for layout, captions, labels and corrupt files).

    Args:
        root: directory scanned recursively.
        image_size: output side length; shorter side resized to it (small images are upscaled).
        mode: ``'RGB'`` or ``'L'`` (grayscale); transparency is composited onto white.
        batch_size, num_workers, seed: loader settings; ``seed`` also fixes the split and augmentation.
        val_fraction: share held out for validation (stratified by class when labelled).
        random_crop: random instead of centre crop for training.
        random_flip: random horizontal flips for training.
        labels_from_subfolders: class label from the first-level subfolder name.
        captions: read captions from ``captions.jsonl`` / sidecar ``.txt`` files.
        scan: :class:`FolderScanOptions` or a mapping of its fields.
        buckets: :class:`~ldm.data.buckets.BucketOptions` (or a mapping of its fields) to train on aspect-ratio
            buckets instead of square crops; their ``base_size`` is ``image_size``. None: square crops.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        mode: str = "RGB",
        batch_size: int = 16,
        num_workers: int = 4,
        val_fraction: float = 0.05,
        seed: int = 0,
        random_crop: bool = False,
        random_flip: bool = True,
        labels_from_subfolders: bool = False,
        captions: bool = True,
        scan: FolderScanOptions | Mapping | None = None,
        judge: str | None = None,
        buckets: BucketOptions | Mapping | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, judge=judge)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if scan is None:
            scan = FolderScanOptions()
        elif isinstance(scan, Mapping):
            fields = dict(scan)
            if "extensions" in fields:
                fields["extensions"] = tuple(fields["extensions"])
            scan = FolderScanOptions(**fields)
        self.save_hyperparameters(ignore=["scan", "buckets"])
        if buckets is not None:
            buckets = dict(buckets) if isinstance(buckets, Mapping) else dataclasses.asdict(buckets)
            # One size for buckets, previews and samples: base_size follows image_size unless both are given.
            if buckets.setdefault("base_size", image_size) in (None, image_size):
                buckets["base_size"] = image_size
            else:
                raise ValueError(f"data.buckets.base_size={buckets['base_size']} differs from data.image_size="
                                 f"{image_size}, which sizes previews and samples; set data.image_size instead")
        self.buckets = None if buckets is None else BucketOptions(**buckets)
        self.bucket_resolutions = bucket_resolutions(self.buckets) if self.buckets is not None else []
        if self.buckets is not None and not self.bucket_resolutions:
            raise ValueError(f"buckets={self.buckets} allow no bucket; raise max_aspect or lower step")
        self.root = Path(root)
        self.scan = scan
        self.val_fraction = val_fraction
        self.labels_from_subfolders = labels_from_subfolders
        self.use_captions = captions
        self.train_transform = ImageTransform(
            image_size, mode, random_crop=random_crop, random_flip=random_flip
        )
        self.val_transform = ImageTransform(image_size, mode)
        self.bucket_transforms = (BucketTransform(mode, random_crop=random_crop, random_flip=random_flip),
                                  BucketTransform(mode))
        self.image_size = image_size
        self.channels = self.train_transform.channels

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        where = str(self.root)
        files, sidecars = scan_image_files(self.root, self.scan.extensions)
        if not files:
            raise ValueError(
                f"no image files with extensions {list(self.scan.extensions)} found under {where}"
            )
        files = drop_unreadable(files, self.val_transform, self.scan, self.seed, where)
        if self.buckets is not None:
            files, sizes = read_sizes(files, self.scan, where)
            self.bucket_ids = assign_buckets(sizes, self.bucket_resolutions)

        labels, class_names = (
            labels_from_first_level(self.root, files) if self.labels_from_subfolders else (None, [])
        )
        captions = collect_captions(self.root, files, sidecars) if self.use_captions else None
        self.num_classes = len(class_names) if labels is not None else None
        self.class_names = class_names
        self.has_captions = captions is not None

        train_idx, val_idx = stratified_split(
            labels if labels is not None else np.zeros(len(files), np.int64), self.val_fraction, self.seed
        )
        if len(train_idx) == 0:
            raise ValueError(f"{where} has {len(files)} readable images, too few to train on; add images")
        self.train_dataset = self._subset(files, labels, captions, train_idx, self.train_transform)
        self.val_dataset = (
            self._subset(files, labels, captions, val_idx, self.val_transform) if len(val_idx) else None
        )

    def _subset(
        self,
        files: Sequence[Path],
        labels: Sequence[int] | None,
        captions: Sequence[str] | None,
        indices: np.ndarray,
        transform: ImageTransform,
    ) -> FileImageDataset:
        pick = indices.tolist()
        if self.buckets is not None:
            train = transform is self.train_transform
            return BucketImageDataset(
                [files[i] for i in pick],
                self.bucket_transforms[0 if train else 1],
                self.bucket_resolutions,
                self.bucket_ids[indices],
                labels=None if labels is None else [labels[i] for i in pick],
                captions=None if captions is None else [captions[i] for i in pick],
                seed=self.seed,
                max_corrupt_fraction=self.scan.max_corrupt_fraction,
                where=str(self.root),
            )
        return FileImageDataset(
            [files[i] for i in pick],
            transform,
            labels=None if labels is None else [labels[i] for i in pick],
            captions=None if captions is None else [captions[i] for i in pick],
            seed=self.seed,
            max_corrupt_fraction=self.scan.max_corrupt_fraction,
            where=str(self.root),
        )

    def train_dataloader(self) -> DataLoader:
        if self.buckets is None:
            return super().train_dataloader()
        dataset = self._require(self.train_dataset, "train")
        sampler = BucketBatchSampler(dataset.bucket_ids, self.batch_size, self.seed, **data_parallel_share(self))
        return self._bucket_loader(dataset, sampler, resumable=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.buckets is None or self.val_dataset is None:
            return super().val_dataloader()
        sampler = BucketBatchSampler(self.val_dataset.bucket_ids, self.batch_size, self.seed, shuffle=False,
                                     drop_last=False, **data_parallel_share(self))
        return self._bucket_loader(self.val_dataset, sampler, resumable=False)

    def _bucket_loader(self, dataset: BucketImageDataset, sampler: BucketBatchSampler, resumable: bool) -> DataLoader:
        # batch_size=None: the sampler yields whole batches and BucketBatches loads one per item, so the
        # resumable loader's saved position counts batches (see ldm.data.buckets).
        return (ResumableDataLoader if resumable else DataLoader)(
            BucketBatches(dataset), sampler=sampler, batch_size=None, num_workers=self.num_workers,
            collate_fn=collate_bucket_examples, pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed),
        )


def read_sizes(files: list[Path], options: FolderScanOptions, where: str) -> tuple[list[Path], list[tuple[int, int]]]:
    """(height, width) of every file from its header; files whose header cannot be read are dropped as
    unreadable (counted against ``max_corrupt_fraction``)."""
    kept, sizes, bad = [], [], []
    for path in files:
        try:
            sizes.append(stored_size(path))
            kept.append(path)
        except Exception:  # noqa: BLE001 - image plugins raise many types (OSError, SyntaxError, struct.error...)
            bad.append(str(path))
    if bad:
        check_corrupt_fraction(len(bad), len(files), options.max_corrupt_fraction, where, bad)
        warnings.warn(f"skipped {len(bad)} image file{'s' if len(bad) != 1 else ''} under {where} whose size cannot "
                      f"be read (first few: {bad[:5]})", UnreadableImageWarning, stacklevel=2)
    return kept, sizes

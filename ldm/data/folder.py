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
* Corrupt files: see :mod:`ldm.data.image_files`. At setup a seeded sample of ``probe_size`` files is
  decoded to fail fast on a mostly-corrupt folder; ``verify=True`` decodes every file up front and drops
  the unreadable ones (exact, but slow on big folders).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.base import ImageDataModule, stratified_split
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
        instance_prompt: one caption for every image of ``root`` (DreamBooth-style small sets, Ruiz et al.
            2023), replacing captions.jsonl / sidecars.
        prior_root: a second folder of prior-preservation images (the class the instances belong to, e.g. made
            by the base model itself), captioned ``prior_prompt`` (or their own captions when it is null).
        prior_weight: prior images per instance image in each epoch (DreamBooth's lambda): the smaller set is
            repeated so that every image of both is seen and the ratio holds. Validation uses ``root`` only.
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
        instance_prompt: str | None = None,
        prior_root: str | None = None,
        prior_prompt: str | None = None,
        prior_weight: float = 1.0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, judge=judge)
        if prior_root is not None and (labels_from_subfolders or not prior_weight > 0):
            raise ValueError("prior_root mixes captioned prior images in: it needs labels_from_subfolders=false and "
                             f"prior_weight > 0 (got {labels_from_subfolders}, {prior_weight})")
        self.instance_prompt, self.prior_prompt, self.prior_weight = instance_prompt, prior_prompt, float(prior_weight)
        self.prior_root = None if prior_root is None else Path(prior_root)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if scan is None:
            scan = FolderScanOptions()
        elif isinstance(scan, Mapping):
            fields = dict(scan)
            if "extensions" in fields:
                fields["extensions"] = tuple(fields["extensions"])
            scan = FolderScanOptions(**fields)
        self.save_hyperparameters(ignore=["scan"])
        self.root = Path(root)
        self.scan = scan
        self.val_fraction = val_fraction
        self.labels_from_subfolders = labels_from_subfolders
        self.use_captions = captions
        self.train_transform = ImageTransform(
            image_size, mode, random_crop=random_crop, random_flip=random_flip
        )
        self.val_transform = ImageTransform(image_size, mode)
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

        labels, class_names = (
            labels_from_first_level(self.root, files) if self.labels_from_subfolders else (None, [])
        )
        captions = collect_captions(self.root, files, sidecars) if self.use_captions else None
        if self.instance_prompt is not None:
            captions = [self.instance_prompt] * len(files)
        self.num_classes = len(class_names) if labels is not None else None
        self.class_names = class_names
        self.has_captions = captions is not None

        train_idx, val_idx = stratified_split(
            labels if labels is not None else np.zeros(len(files), np.int64), self.val_fraction, self.seed
        )
        if len(train_idx) == 0:
            raise ValueError(f"{where} has {len(files)} readable images, too few to train on; add images")
        if self.prior_root is not None:
            files, captions, train_idx = self._with_prior(files, captions or [""] * len(files), train_idx)
        self.train_dataset = self._subset(files, labels, captions, train_idx, self.train_transform)
        self.val_dataset = (
            self._subset(files, labels, captions, val_idx, self.val_transform) if len(val_idx) else None
        )

    def _with_prior(self, files: list[Path], captions: list[str], train_idx: np.ndarray):
        """Files and captions extended by the prior folder, and a training index list that repeats the smaller
        side so that prior images number ``prior_weight`` x instance images, each image seen at least once."""
        prior, sidecars = scan_image_files(self.prior_root, self.scan.extensions)
        if not prior:
            raise ValueError(f"no image files found under prior_root={self.prior_root}")
        prior = drop_unreadable(prior, self.val_transform, self.scan, self.seed, str(self.prior_root))
        if self.prior_prompt is not None:
            prior_captions = [self.prior_prompt] * len(prior)
        else:
            prior_captions = collect_captions(self.prior_root, prior, sidecars) or [""] * len(prior)
        instances = len(train_idx)
        # n_inst instance draws and n_prior = weight * n_inst prior draws, both covering their whole set
        n_inst = max(instances, int(np.ceil(len(prior) / self.prior_weight)))
        n_prior = max(len(prior), int(round(self.prior_weight * n_inst)))
        offset = len(files)
        index = np.concatenate([np.resize(train_idx, n_inst), offset + np.resize(np.arange(len(prior)), n_prior)])
        return [*files, *prior], [*captions, *prior_captions], index

    def _subset(
        self,
        files: Sequence[Path],
        labels: Sequence[int] | None,
        captions: Sequence[str] | None,
        indices: np.ndarray,
        transform: ImageTransform,
    ) -> FileImageDataset:
        pick = indices.tolist()
        return FileImageDataset(
            [files[i] for i in pick],
            transform,
            labels=None if labels is None else [labels[i] for i in pick],
            captions=None if captions is None else [captions[i] for i in pick],
            seed=self.seed,
            max_corrupt_fraction=self.scan.max_corrupt_fraction,
            where=str(self.root),
        )

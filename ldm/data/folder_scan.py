"""Scanning a user's image folder: which files are images, their captions (captions.jsonl or sidecar .txt),
labels from first-level subfolders, unreadable files, and image sizes from file headers."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.buckets import stored_size
from ldm.data.image_files import ImageTransform, UnreadableImageWarning, check_corrupt_fraction, is_readable

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

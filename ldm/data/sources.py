"""What ``ldm-prepare`` converts into shards: an image folder, a torchvision dataset, or webdataset tars.

A source is cut into slices, each written as one shard (:mod:`ldm.data.shards`); a slice's ``key`` says what it
holds (file names and sizes, a tar's name and size), so a re-run can tell a finished shard of the same data from
one of changed data. ``read(slice)`` yields raw samples ``{key, image: bytes, caption: str | None, label: int |
None}`` (+ ``width``/``height`` where the source records the original size); decoding and checking happen in
:mod:`ldm.prepare`, the same for every source.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RawSample = dict[str, Any]


@dataclass(frozen=True)
class Slice:
    index: int  # the shard number
    key: str  # what the slice holds, for the re-run check
    items: Any  # what `read` needs: file paths, an index range, a tar path


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _check_per_shard(samples_per_shard: int) -> None:
    if samples_per_shard < 1:
        raise ValueError(f"source.samples_per_shard must be >= 1, got {samples_per_shard}")


class FolderSource:
    """An image folder as :class:`ldm.data.folder.ImageFolderDataModule` reads it (captions from
    ``captions.jsonl`` or sidecar ``.txt`` files, labels from first-level subfolders), ``samples_per_shard``
    files per slice in sorted path order."""

    def __init__(self, root: str, samples_per_shard: int = 1000, captions: bool = True,
                 labels_from_subfolders: bool = False, extensions: Sequence[str] | None = None) -> None:
        from ldm.data.folder import (
            DEFAULT_EXTENSIONS,
            collect_captions,
            labels_from_first_level,
            scan_image_files,
        )

        _check_per_shard(samples_per_shard)
        self.root = Path(root)
        files, sidecars = scan_image_files(self.root, tuple(extensions or DEFAULT_EXTENSIONS))
        if not files:
            raise ValueError(f"no image files found under {self.root}: point source.root at a folder of images")
        self.files = files
        self.captions = collect_captions(self.root, files, sidecars) if captions else None
        self.labels, self.class_names = (labels_from_first_level(self.root, files) if labels_from_subfolders
                                         else (None, []))
        self.samples_per_shard = samples_per_shard

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def slices(self) -> list[Slice]:
        out = []
        for shard, start in enumerate(range(0, len(self.files), self.samples_per_shard)):
            positions = range(start, min(start + self.samples_per_shard, len(self.files)))
            names = [f"{self.files[i].relative_to(self.root).as_posix()}:{self.files[i].stat().st_size}"
                     f":{self.captions[i] if self.captions else ''}:{self.labels[i] if self.labels else ''}"
                     for i in positions]
            out.append(Slice(shard, _digest(names), positions))
        return out

    def read(self, piece: Slice) -> Iterator[RawSample]:
        for i in piece.items:
            yield {"key": self.files[i].relative_to(self.root).as_posix(), "image": self.files[i].read_bytes(),
                   "caption": self.captions[i] if self.captions else None,
                   "label": self.labels[i] if self.labels else None}


class TorchvisionSource:
    """MNIST, CIFAR-10 (arrays, stored as lossless PNG) or CelebA (its JPEG files) from torchvision's layout.

    ``captions``: MNIST and CIFAR-10 get one class phrasing per sample (:mod:`ldm.data.captions`, seeded by the
    sample's index); CelebA has none."""

    def __init__(self, name: str, root: str, split: str = "train", download: bool = False,
                 samples_per_shard: int = 1000, captions: bool = True) -> None:
        from ldm.data.captions import CIFAR10_CLASS_NAMES, CLASS_NAMES, caption_for, cifar10_caption_for
        from ldm.data.torchvision_data import DATASET_NAMES, TorchvisionDataModule

        _check_per_shard(samples_per_shard)
        if name not in DATASET_NAMES:
            raise ValueError(f"source.name must be one of {DATASET_NAMES}, got {name!r}")
        if split not in ("train", "test"):
            raise ValueError(f"source.split must be 'train' or 'test', got {split!r}")
        module = TorchvisionDataModule(name, root, download=download)
        if download:
            module.prepare_data()
        self.dataset = module._torchvision_dataset(split == "train")
        self.name, self.split, self.samples_per_shard = name, split, samples_per_shard
        self.class_names = {"mnist": list(CLASS_NAMES), "cifar10": list(CIFAR10_CLASS_NAMES)}.get(name, [])
        self.caption_fn = {"mnist": caption_for, "cifar10": cifar10_caption_for}.get(name) if captions else None

    @property
    def has_captions(self) -> bool:
        return self.caption_fn is not None

    def __len__(self) -> int:
        return len(self.dataset.filename) if self.name == "celeba" else len(self.dataset.data)

    def slices(self) -> list[Slice]:
        n = len(self)
        return [Slice(shard, f"{self.name}/{self.split}[{start}:{min(start + self.samples_per_shard, n)}]",
                      range(start, min(start + self.samples_per_shard, n)))
                for shard, start in enumerate(range(0, n, self.samples_per_shard))]

    def read(self, piece: Slice) -> Iterator[RawSample]:
        from PIL import Image

        from ldm.data.base import sample_seed

        for i in piece.items:
            key = f"{self.name}/{self.split}/{i}"
            if self.name == "celeba":
                path = Path(self.dataset.root, self.dataset.base_folder, "img_align_celeba", self.dataset.filename[i])
                yield {"key": key, "image": path.read_bytes(), "caption": None, "label": None}
                continue
            pixels = np.asarray(self.dataset.data[i])  # (28, 28) uint8 or (32, 32, 3)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            label = int(self.dataset.targets[i])
            caption = (self.caption_fn(label, np.random.default_rng(sample_seed(0, 0, i)))
                       if self.caption_fn else None)
            yield {"key": key, "image": buffer.getvalue(), "caption": caption, "label": label}


class WebDatasetSource:
    """webdataset tar shards in img2dataset's layout (``000000.tar`` holding ``<key>.jpg``, ``<key>.txt``,
    ``<key>.json``), read with ``webdataset``; one slice per tar.

    urls: a list of tar paths or URLs, or one glob pattern / brace pattern (``data/{00000..00009}.tar``).
    caption_key: the member holding the caption; ``require_captions``: a sample without it is an error naming
        it (false: such samples get ``""``, the unconditional prompt).
    image_keys: members tried in order for the image.
    The original size comes from img2dataset's json (``original_width``/``original_height``) when present, as
    the stored image may have been resized by img2dataset.
    """

    def __init__(self, urls: str | Sequence[str], caption_key: str = "txt", require_captions: bool = True,
                 image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"), captions: bool = True) -> None:
        self.urls = self._expand(urls)
        self.caption_key = caption_key
        self.require_captions = require_captions
        self.image_keys = tuple(image_keys)
        self.class_names: list[str] = []
        self.use_captions = captions

    @property
    def has_captions(self) -> bool:
        return self.use_captions

    @staticmethod
    def _expand(urls: str | Sequence[str]) -> list[str]:
        import braceexpand

        patterns = [urls] if isinstance(urls, str) else list(urls)
        out: list[str] = []
        for pattern in patterns:
            for url in braceexpand.braceexpand(str(pattern)):
                local = glob.glob(url) if any(c in url for c in "*?[") else [url]
                out.extend(sorted(local))
        if not out:
            raise ValueError(f"source.urls={urls!r} matches no tar file: give tar paths, a glob or a brace pattern")
        return out

    def slices(self) -> list[Slice]:
        out = []
        for shard, url in enumerate(self.urls):
            size = Path(url).stat().st_size if Path(url).is_file() else "remote"
            out.append(Slice(shard, f"{url}:{size}", url))
        return out

    def read(self, piece: Slice) -> Iterator[RawSample]:
        import webdataset as wds

        # No node/worker splitting: ldm-prepare hands each process whole tars itself.
        tars = wds.WebDataset(piece.items, shardshuffle=False, empty_check=False, nodesplitter=None,
                              workersplitter=None)
        stem = Path(str(piece.items)).name.split(".")[0]
        try:
            for record in tars:
                yield self._sample(record, stem, piece.items)
        except CaptionMissingError:
            raise
        except Exception as error:  # noqa: BLE001 - tarfile, gzip, fsspec and webdataset each raise their own
            raise ValueError(f"cannot read webdataset tar {piece.items}: {type(error).__name__}: {error}. Replace "
                             "the file (or drop it from source.urls) and run ldm-prepare again") from error

    def _sample(self, record: dict[str, Any], stem: str, url: str) -> RawSample:
        key = f"{stem}/{record['__key__']}"
        image_key = next((k for k in self.image_keys if k in record), None)
        caption = None
        if self.use_captions:
            raw = record.get(self.caption_key)
            if raw is None and self.require_captions:
                raise CaptionMissingError(
                    f"sample {key} in {url} has no '{self.caption_key}' member (it has {sorted(k for k in record if not k.startswith('__'))}): "
                    "set source.caption_key to the member holding captions, or source.require_captions=false to "
                    "train such samples with the empty prompt")
            caption = raw.decode("utf-8").strip() if raw is not None else ""
        sample: RawSample = {"key": key, "image": record.get(image_key) if image_key else None, "caption": caption,
                             "label": None}
        meta = record.get("json")
        if meta:
            try:
                info = json.loads(meta)
            except json.JSONDecodeError:
                info = {}
            if isinstance(info, dict) and info.get("original_width") and info.get("original_height"):
                sample["width"], sample["height"] = int(info["original_width"]), int(info["original_height"])
        return sample


class CaptionMissingError(ValueError):
    """A webdataset sample lacks its caption member while captions are required."""

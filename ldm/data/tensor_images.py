"""Whole datasets held as one preprocessed uint8 tensor: fitting images to a size, and the dataset over them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.base import CaptionFn, SampleKey, sample_rng


def fit_uint8_images(images: torch.Tensor, image_size: int, resize_mode: str) -> torch.Tensor:
    """Bring a uint8 stack (N, C, h, w) of square-ish images to (N, C, image_size, image_size).

    ``pad`` centres the image on a zero (black) canvas and is exact, which suits MNIST-style digits
    on black; ``resize`` uses antialiased bilinear interpolation, then rounds back to uint8 (a 1/255
    quantisation, far below anything a generative model resolves).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if (height, width) == (image_size, image_size):
        return images.contiguous()
    if resize_mode == "pad":
        if image_size < max(height, width):
            raise ValueError(
                f"resize_mode='pad' cannot shrink {height}x{width} images to {image_size}; "
                "use resize_mode='resize' or image_size >= the source size"
            )
        top, left = (image_size - height) // 2, (image_size - width) // 2
        padding = (left, image_size - width - left, top, image_size - height - top)
        return F.pad(images, padding, value=0)
    if resize_mode == "resize":
        chunks = []
        # Chunked so a 60k-image stack does not need one huge float32 copy at once.
        for chunk in images.split(4096):
            resized = F.interpolate(
                chunk.float(),
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            chunks.append(resized.round_().clamp_(0, 255).to(torch.uint8))
        return torch.cat(chunks)
    raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}")


def uint8_to_signed_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.to(torch.float32).div_(127.5).sub_(1.0)


class TensorImageDataset(Dataset):
    """A whole dataset held as one preprocessed uint8 tensor (N, C, H, W); no per-item decoding.

    Only the uint8 form stays resident (4x smaller than float32, which matters for 60k MNIST or
    50k CIFAR); conversion to [-1, 1] is a cheap per-item cast.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        caption_fn: CaptionFn | None = None,
        seed: int = 0,
        random_flip: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if caption_fn is not None and labels is None:
            raise ValueError("captions are derived from labels, so caption_fn needs labels")
        self.images = images.contiguous()
        self.labels = None if labels is None else labels.to(torch.long)
        self.caption_fn = caption_fn
        self.seed = seed
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, rng = sample_rng(self.seed, key)
        image = uint8_to_signed_unit(self.images[index])  # (C, H, W)
        if self.random_flip and rng.random() < 0.5:
            image = image.flip(-1)
        example: dict[str, Any] = {"image": image}
        if self.labels is not None:
            label = int(self.labels[index])
            example["label"] = label
            if self.caption_fn is not None:
                example["caption"] = self.caption_fn(label, rng)
        return example

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
from collections.abc import Mapping, Sequence
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
)
from ldm.data.folder_scan import (  # noqa: F401  (re-exported: ldm.data.folder is where users look)
    CAPTIONS_FILE,
    DEFAULT_EXTENSIONS,
    FolderScanOptions,
    MissingCaptionWarning,
    collect_captions,
    drop_unreadable,
    labels_from_first_level,
    read_captions_jsonl,
    read_sizes,
    scan_image_files,
)
from ldm.data.image_files import (
    FileImageDataset,
    ImageTransform,
)


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
        instance_prompt: one caption for every image of ``root`` (DreamBooth-style small sets, Ruiz et al.
            2023), replacing captions.jsonl / sidecars.
        prior_root: a second folder of prior-preservation images (the class the instances belong to, e.g. made
            by the base model itself), captioned ``prior_prompt`` (or their own captions when it is null).
        prior_weight: prior images per instance image in each epoch (DreamBooth's lambda): the smaller set is
            repeated so that every image of both is seen and the ratio holds.

    Validation holds out ``val_fraction`` of ``root``'s images, except for a DreamBooth set (``instance_prompt``),
    whose images all train: ``val_fraction`` of the prior images are held out instead (none without
    ``prior_root``, and then no validation runs).
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

    @property
    def metrics_reference(self) -> str:
        return str(self.root)

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
        if self.instance_prompt is not None:
            captions = [self.instance_prompt] * len(files)
        self.num_classes = len(class_names) if labels is not None else None
        self.class_names = class_names
        self.has_captions = captions is not None

        if self.instance_prompt is not None:
            # A DreamBooth set is a handful of images of one subject, every one of which must train (Ruiz et al.
            # hold none out); validation comes from the prior images, if any (see _with_prior).
            train_idx, val_idx = np.arange(len(files), dtype=np.int64), np.zeros(0, np.int64)
        else:
            train_idx, val_idx = stratified_split(
                labels if labels is not None else np.zeros(len(files), np.int64), self.val_fraction, self.seed
            )
        if len(train_idx) == 0:
            raise ValueError(f"{where} has {len(files)} readable images, too few to train on; add images")
        if self.prior_root is not None:
            files, captions, train_idx, val_idx = self._with_prior(files, captions or [""] * len(files), train_idx,
                                                                   val_idx)
        self.train_dataset = self._subset(files, labels, captions, train_idx, self.train_transform)
        self.val_dataset = (
            self._subset(files, labels, captions, val_idx, self.val_transform) if len(val_idx) else None
        )

    def _with_prior(self, files: list[Path], captions: list[str], train_idx: np.ndarray, val_idx: np.ndarray):
        """Files and captions extended by the prior folder, a training index list that repeats the smaller side so
        that prior images number ``prior_weight`` x instance images, each image seen at least once, and the
        validation indices: ``val_idx`` of root, or with ``instance_prompt`` (no instance held out) ``val_fraction``
        of the prior images."""
        prior, sidecars = scan_image_files(self.prior_root, self.scan.extensions)
        if not prior:
            raise ValueError(f"no image files found under prior_root={self.prior_root}")
        prior = drop_unreadable(prior, self.val_transform, self.scan, self.seed, str(self.prior_root))
        if self.buckets is not None:  # the prior images take their own buckets, after the instances'
            prior, sizes = read_sizes(prior, self.scan, str(self.prior_root))
            self.bucket_ids = np.concatenate([self.bucket_ids, assign_buckets(sizes, self.bucket_resolutions)])
        if self.prior_prompt is not None:
            prior_captions = [self.prior_prompt] * len(prior)
        else:
            prior_captions = collect_captions(self.prior_root, prior, sidecars) or [""] * len(prior)
        prior_train, prior_val = np.arange(len(prior), dtype=np.int64), np.zeros(0, np.int64)
        if self.instance_prompt is not None:
            prior_train, prior_val = stratified_split(np.zeros(len(prior), np.int64), self.val_fraction, self.seed)
        instances = len(train_idx)
        # n_inst instance draws and n_prior = weight * n_inst prior draws, both covering their whole set
        n_inst = max(instances, int(np.ceil(len(prior_train) / self.prior_weight)))
        n_prior = max(len(prior_train), int(round(self.prior_weight * n_inst)))
        offset = len(files)
        index = np.concatenate([np.resize(train_idx, n_inst), offset + np.resize(prior_train, n_prior)])
        return [*files, *prior], [*captions, *prior_captions], index, np.concatenate([val_idx, offset + prior_val])

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

